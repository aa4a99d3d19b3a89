# blockcrypt in a container: the same install script as `make test` and `make demo` on a host.
#   docker build -t blockcrypt .
#   docker run --rm -it --device /dev/fuse --cap-add SYS_ADMIN --security-opt apparmor:unconfined \
#       -v /var/lib/blockcrypt:/var/lib/blockcrypt blockcrypt blockcrypt status
# Loop devices (make demo, the ext4 tests) need --privileged instead of the two flags above.
FROM debian:12
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        python3 python3-venv python3-dev make ca-certificates && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/blockcrypt
COPY . .
RUN bash scripts/install-deps.sh && make build PY=python3 && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/blockcrypt/.venv/bin:$PATH
CMD ["blockcrypt", "--help"]
