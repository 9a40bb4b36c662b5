set -e
cd /work/main
rm -rf runs/w8a8-cpu/out && mkdir -p runs/w8a8-cpu/out
dit-compress apply w8a8-cpu --model reference --out runs/w8a8-cpu/out/w8a8-cpu
dit-compress apply w8a8-int8 --model reference --out runs/w8a8-cpu/out/w8a8-int8
dit-compress export openvino runs/w8a8-cpu/out/w8a8-cpu --out runs/w8a8-cpu/out/w8a8-cpu-ov --qdq-activations int8
dit-compress export openvino runs/w8a8-cpu/out/w8a8-int8 --out runs/w8a8-cpu/out/w8a8-int8-ov --qdq-activations int8
dit-compress export openvino reference --out runs/w8a8-cpu/out/nncf-int8-ov --quantizer nncf
dit-compress export openvino reference --out runs/w8a8-cpu/out/reference-ov
dit-compress bench runs/w8a8-cpu/out/reference-ov runs/w8a8-cpu/out/w8a8-int8-ov runs/w8a8-cpu/out/w8a8-cpu-ov runs/w8a8-cpu/out/nncf-int8-ov --baseline reference --samples 1000 --out runs/w8a8-cpu/out/bench
