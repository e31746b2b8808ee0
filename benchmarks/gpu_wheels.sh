#!/bin/bash
# The wheelhouse benchmarks/gpu_check.sh unpacks on a CUDA machine whose Python has PyTorch but
# not Ray, zarr or dask (nothing fetched there): rayscreen's other packages, small enough to copy
# over (ray without its Java jars, RLlib, Serve, LLM and the dashboard's source map:
# 79 -> 43 MB). Usage: gpu_wheels.sh DEST [PYTHON_VERSION, default 3.12]
set -euo pipefail
dest=$1; pyver=${2:-3.12}
dl=$(mktemp -d)
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_5_x86_64"
pkgs="ray==2.60.0 zarr==3.1.6 numcodecs==0.16.6 dask==2026.8.0 donfig==0.8.1.post1 xarray==2026.9.0 fsspec==2026.9.0
 importlib_metadata partd locket opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions
 opentelemetry-exporter-prometheus opentelemetry-proto pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
 colorful aiohttp_cors jsonschema==4.26.0 referencing rpds-py jsonschema-specifications opencensus opencensus-context
 google-api-core googleapis-common-protos proto-plus google-auth pyasn1 pyasn1-modules smart_open lazy-importer
 tensorboardx google-crc32c"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version $pyver --implementation cp $plat --platform any -d $dl $pkgs
mkdir -p $dest
rm -f $dest/*.whl
for w in $dl/*.whl; do
  case $(basename $w) in
    ray-*)
      # strip: rewrite the wheel without the parts a local CPU/GPU run never loads
      python3 - "$w" "$dest" <<'PY'
import sys, zipfile, os
src, dest = sys.argv[1], sys.argv[2]
drop = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/build/static/js/main")
out = os.path.join(dest, os.path.basename(src))
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
    for i in zin.infolist():
        if i.filename.startswith(drop) and not i.filename.endswith(".js"):
            continue
        data = zin.read(i.filename)
        if i.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.split(b"\n") if not l.decode().startswith(drop) or l.decode().split(",")[0].endswith(".js")) 
        zout.writestr(i, data)
PY
      ;;
    *) cp $w $dest/ ;;
  esac
done
du -sh $dest
