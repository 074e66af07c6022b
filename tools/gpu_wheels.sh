#!/usr/bin/env bash
# `make gpu-wheels`: write .whl/ with the Python 3.12 x86-64 wheels that the bare CUDA PyTorch
# image of the GPU machine lacks (docs/gpu.md), for tools/gpu_check.sh to install offline.
# Runs on any machine with pip and network; never downloads torch. Rerunning gives the same
# folder: the downloads come back byte-identical from the index (pip's cache makes that cheap)
# and an already built DeepSpeed wheel is reused.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PY=${PYTHON:-python3}
DEST=.whl
LIMIT_MIB=50  # the device tool carries 64 MiB per call in all, the working tree included

# One version of each (two versions of one package stop the offline install). megatron-core
# has compiled parts: a cp312 manylinux wheel. DeepSpeed needs pydantic (and what pydantic
# needs) and hjson, which the image does not have; pydantic 2.14 needs typing-extensions
# >= 4.16, newer than an image may hold, and a newer typing-extensions is backward compatible.
BINARY=(
    megatron-core==0.16.1
    hjson==3.1.0
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
)
DEEPSPEED=0.19.8  # an sdist only: built here, without its CUDA ops (DS_BUILD_OPS=0)

# The exact flags of the device tool's notes: pip matches each manylinux tag exactly.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)
platform_flags=()
for p in "${PLATFORMS[@]}"; do platform_flags+=(--platform "$p"); done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/whl"

echo "gpu-wheels: downloading ${BINARY[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_flags[@]}" -d "$work/whl" "${BINARY[@]}" || { echo "gpu-wheels: pip download failed" >&2; exit 1; }

ds_wheel=deepspeed-$DEEPSPEED-py3-none-any.whl
if [[ -f $DEST/$ds_wheel ]]; then
    cp "$DEST/$ds_wheel" "$work/whl/"
else
    echo "gpu-wheels: building deepspeed==$DEEPSPEED (DS_BUILD_OPS=0)"
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$work/whl" "deepspeed==$DEEPSPEED" \
        || { echo "gpu-wheels: building the DeepSpeed wheel failed" >&2; exit 1; }
fi
# Without compiled ops DeepSpeed is pure Python: one wheel for any CPython 3.
if [[ ! -f $work/whl/$ds_wheel ]]; then
    echo "gpu-wheels: expected a pure-Python $ds_wheel, got: $(cd "$work/whl" && echo deepspeed-*)" >&2
    exit 1
fi

# Each wheel must unzip, exist once, and need nothing that is neither carried nor in the image.
"$PY" - "$work/whl" <<'EOF' || exit 1
import re, sys, zipfile
from pathlib import Path
try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.markers import Marker
    from pip._vendor.packaging.requirements import Requirement

# The image's Python packages (the device tool's KINDS.md, 'Python packages already there').
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas
pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow
pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark
pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

# The GPU machine: CPython 3.12 on x86-64 Linux; no extras are installed.
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
image = {norm(n) for n in IMAGE}
wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
carried, needs = {}, []
for whl in wheels:
    with zipfile.ZipFile(whl) as z:
        bad = z.testzip()
        if bad:
            sys.exit(f"gpu-wheels: {whl.name} is damaged ({bad})")
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    name = norm(re.search(r"^Name: (.+)$", meta, re.M).group(1).strip())
    if name in carried:
        sys.exit(f"gpu-wheels: two wheels of {name}: {carried[name]} and {whl.name}")
    carried[name] = whl.name
    for line in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(ENV):
            needs.append((name, req))
missing = []
for owner, req in needs:
    dep = norm(req.name)
    if dep in carried:
        continue
    if dep not in image:
        missing.append(f"{req} (needed by {owner})")
    elif str(req.specifier):
        print(f"gpu-wheels: {owner} needs {req} from the image (gpu_check.sh's preflight checks the version there)")
if missing:
    sys.exit("gpu-wheels: neither carried nor in the image: " + "; ".join(missing))
EOF

rm -rf "$DEST"
mv "$work/whl" "$DEST"
total=0
for f in "$DEST"/*.whl; do
    size=$(stat -c %s "$f")
    total=$((total + size))
    awk -v s="$size" -v f="$(basename "$f")" 'BEGIN { printf "%8.2f MiB  %s\n", s / 1048576, f }'
done
awk -v s="$total" -v d="$DEST" -v l="$LIMIT_MIB" 'BEGIN { printf "%8.2f MiB  total in %s/ (limit %d MiB)\n", s / 1048576, d, l }'
if (( total > LIMIT_MIB * 1048576 )); then
    echo "gpu-wheels: $DEST/ is over $LIMIT_MIB MiB; the device tool carries 64 MiB per call in all" >&2
    exit 1
fi
