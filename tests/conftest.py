"""Suite-wide settings.

torch runs the tests' tiny models one op at a time; with its default intra-op pool on a busy
2-core machine each small matmul waited milliseconds on spinning threads (a 64-token greedy run
took 20 s instead of under 1 s). One torch thread keeps the suite fast; ONNX Runtime sessions
choose their own threads.
"""


def pytest_configure(config):
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)

