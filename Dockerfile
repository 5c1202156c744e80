# meshgate container image: the gateway plus the demo's mock-service binary.
#
#   docker build -t meshgate:local .
#   docker run --rm -p 8080:8080 meshgate:local demo            # embedded demo
#   docker run --rm -p 8080:8080 -e MESHGATE_DISCOVERY__PROVIDER=consul \
#       -e CONSUL_HTTP_ADDR=http://consul:8500 meshgate:local     # configured by environment
#
# Stage 1 builds both binaries with the Rust toolchain; stage 2 is a distroless image with
# glibc, libgcc and CA certificates only (no shell, no package manager), running as the
# unprivileged user 65532 ("nonroot"). The image carries no config file: the gateway takes its
# configuration from MESHGATE_* environment variables, or from a file mounted and passed with
# --config (see k8s/ and docker-compose.yml).

ARG RUST_VERSION=1
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src

# Dependencies first, in their own layer, so that changing the sources does not rebuild them:
# compile the dependency graph against stub targets, then throw the stubs away.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > src/bin/mock-service.rs \
 && : > src/lib.rs \
 && cargo build --release --locked --bins \
 && rm -rf src

COPY . .
# COPY keeps the context's file times, which can be older than the stub build: touch the
# crate roots so cargo rebuilds the real crate.
RUN touch src/lib.rs src/main.rs src/bin/mock-service.rs \
 && cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/meshgate target/release/mock-service /out/ \
 && strip --strip-debug /out/meshgate /out/mock-service

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/meshgate /out/mock-service /usr/local/bin/
# 8080: the gateway (MESHGATE_LISTEN defaults to 0.0.0.0:8080). 9901: the admin listener, which
# defaults to 127.0.0.1 and so is unreachable from outside the container until
# MESHGATE_ADMIN__LISTEN=0.0.0.0:9901 is set, which also requires MESHGATE_ADMIN_TOKEN (a bearer
# token for it). Set both at run time (docker-compose.yml, k8s/), never in the image.
EXPOSE 8080 9901
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/meshgate"]
CMD ["run"]
