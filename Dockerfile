# Container images of mx-pod and backupmx-operator, for CI systems with a container builder.
# The same images as `make images` (images/build.sh + images/make-image.sh, which need no daemon):
# static glibc binaries (crt-static), no shell, no libc, user 65532:65532, the binary as
# /usr/local/bin/NAME and the entrypoint. Keep USER, ENTRYPOINT and CMD in step with
# images/make-image.sh and images/build.sh (tests/tests/operator/chart.rs compares them).
#
#   docker build --target mx-pod            -t backupmx/mx-pod:0.1.0 .
#   docker build --target backupmx-operator -t backupmx/backupmx-operator:0.1.0 .

# --- build: both static binaries --------------------------------------------------------------
FROM rust:1.89-bookworm AS build
WORKDIR /build/backupmx
# only what the build needs (no target/): the workspace and the image's /etc files
COPY Cargo.toml Cargo.lock ./
COPY mx-pod mx-pod
COPY operator operator
COPY tests tests
COPY images/rootfs images/rootfs
ENV RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=/build/backupmx=/build/backupmx --remap-path-prefix=/usr/local/cargo=/cargo" \
    CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN cargo build --release --locked --target x86_64-unknown-linux-gnu \
      -p mx-pod -p backupmx-operator --bin mx-pod --bin backupmx-operator \
 && for b in mx-pod backupmx-operator; do \
      ldd target/x86_64-unknown-linux-gnu/release/$b 2>&1 | grep -Eq 'not a dynamic executable|statically linked' \
        || { echo "$b is not static" >&2; exit 1; }; \
    done
# the image's root filesystem, as images/make-image.sh lays it out
RUN mkdir -p /rootfs/usr/local/bin /rootfs/etc/ssl/certs /rootfs/tmp /rootfs/home/nonroot \
 && chmod 1777 /rootfs/tmp \
 && install -m 0644 images/rootfs/etc/passwd images/rootfs/etc/group images/rootfs/etc/nsswitch.conf /rootfs/etc/ \
 && install -m 0644 /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ca-certificates.crt

# --- mx-pod ---------------------------------------------------------------------------------------
FROM scratch AS mx-pod
COPY --from=build /rootfs/ /
COPY --from=build /build/backupmx/target/x86_64-unknown-linux-gnu/release/mx-pod /usr/local/bin/mx-pod
ENV PATH=/usr/local/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
LABEL org.opencontainers.image.title=mx-pod org.opencontainers.image.licenses=Apache-2.0
EXPOSE 2525/tcp 8025/tcp
USER 65532:65532
WORKDIR /
ENTRYPOINT ["/usr/local/bin/mx-pod"]
CMD ["serve", "--config", "/etc/mx-pod/config/mx-pod.toml"]

# --- backupmx-operator (last: the default target) -------------------------------------------------
FROM scratch AS backupmx-operator
COPY --from=build /rootfs/ /
COPY --from=build /build/backupmx/target/x86_64-unknown-linux-gnu/release/backupmx-operator /usr/local/bin/backupmx-operator
ENV PATH=/usr/local/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
LABEL org.opencontainers.image.title=backupmx-operator org.opencontainers.image.licenses=Apache-2.0
EXPOSE 8080/tcp
USER 65532:65532
WORKDIR /
ENTRYPOINT ["/usr/local/bin/backupmx-operator"]
CMD ["run"]
