# Sourced by the GPU benchmark scripts: wheels the GPU image lacks (grain, array-record,
# ml-collections, portpicker, tensorboardX, tqdm; carried in .whl/), the repository on PYTHONPATH,
# a compile cache. The wheels, for the GPU's Python 3.12:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 portpicker tensorboardX==2.6.5 tqdm
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/fastblt-jax-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
