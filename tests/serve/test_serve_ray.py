"""The same app as a Ray Serve deployment on a local Ray (one replica, the tiny folder), through the
openai client: its replies equal the in-process server's."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve")


@pytest.mark.slow
def test_ray_serve_replica_answers_like_the_generator(tiny_folders, served_models):
    import openai
    import ray

    from edgellama.serve import ray_app
    from edgellama.serve.settings import ServeSettings

    messages = [{"role": "user", "content": "hello ray"}]
    want = served_models["tiny"].generator.generate(messages, chat=True, max_new_tokens=10)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        url = ray_app.start([f"tiny={tiny_folders['tiny']}"], replicas=1, provider="cpu", threads=1,
                            settings=ServeSettings(api_key="k"), host="127.0.0.1", port=0)
        api = openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=120)
        got = api.chat.completions.create(model="tiny", messages=messages, max_tokens=10)
        assert got.choices[0].message.content == want.text
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           api.chat.completions.create(model="tiny", messages=messages, max_tokens=10, stream=True))
        assert streamed == want.text
        with pytest.raises(openai.NotFoundError):
            api.chat.completions.create(model="ghost", messages=messages)
        ray_app.stop()
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
