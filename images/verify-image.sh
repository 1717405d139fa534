#!/usr/bin/env bash
# verify-image.sh TARBALL NAME REF - checks an image tarball of make-image.sh without a daemon,
# then runs its binary from the image's own root filesystem. Exits non-zero with a message on the
# first failed check (run by build.sh, i.e. `make images`; needs root for chroot).
#
#  - archive layout: manifest.json, repositories, <sha256>.json config, <sha256>/layer.tar; the
#    names are the sha256 of the contents; RepoTags is REF
#  - config: User 65532:65532, Entrypoint ["/usr/local/bin/NAME"], no shell anywhere
#  - layer: /usr/local/bin/NAME 0755 root-owned, every entry owner 0:0 and mtime 0, sorted
#  - runs: `NAME --version` in a chroot of the layer as uid 65532 (no libc, no shell in there),
#    then a connection to a host name found through /etc/hosts (NSS files) and one found through
#    a DNS server (NSS dns; python fake_dns.py on 127.0.0.153:53), both answered by "connection
#    refused" on 127.0.0.1:1, i.e. the lookup worked; and an unknown name that must fail as a
#    lookup error (so the two above prove something).
set -euo pipefail
TAR=${1:?usage: verify-image.sh TARBALL NAME REF}
NAME=${2:?usage: verify-image.sh TARBALL NAME REF}
REF=${3:?usage: verify-image.sh TARBALL NAME REF}
HERE="$(cd "$(dirname "$0")" && pwd)"
log() { printf '[verify-image %s] %s\n' "$NAME" "$*"; }
die() { printf '[verify-image %s] ERROR: %s\n' "$NAME" "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (chroot)"

W=$(mktemp -d)
DNS_PID=
cleanup() {
  [ -n "$DNS_PID" ] && kill "$DNS_PID" 2> /dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W/archive" "$W/root"
tar -xf "$TAR" -C "$W/archive"

# layout and config, checked in python (JSON)
python3 - "$W/archive" "$NAME" "$REF" << 'PY'
import hashlib, json, os, sys
d, name, ref = sys.argv[1:]
def fail(msg):
    sys.exit(f"[verify-image {name}] ERROR: {msg}")
def sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()
files = sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)
m = json.load(open(os.path.join(d, "manifest.json")))
if len(m) != 1:
    fail(f"manifest.json has {len(m)} images")
m = m[0]
cfg_name, layers = m["Config"], m["Layers"]
want = sorted(["manifest.json", "repositories", cfg_name] + layers)
if files != want:
    fail(f"archive holds {files}, want {want}")
if m["RepoTags"] != [ref]:
    fail(f"RepoTags {m['RepoTags']} != [{ref}]")
if cfg_name != sha(os.path.join(d, cfg_name)) + ".json":
    fail("config file name is not its sha256")
cfg = json.load(open(os.path.join(d, cfg_name)))
if len(layers) != 1:
    fail(f"{len(layers)} layers, want 1")
lsha = sha(os.path.join(d, layers[0]))
if cfg["rootfs"]["diff_ids"] != ["sha256:" + lsha] or layers[0] != f"{lsha}/layer.tar":
    fail("layer digest does not match the config's diff_ids")
c = cfg["config"]
checks = {
    "User": (c.get("User"), "65532:65532"),
    "Entrypoint": (c.get("Entrypoint"), [f"/usr/local/bin/{name}"]),
    "WorkingDir": (c.get("WorkingDir"), "/"),
    "os/architecture": ((cfg["os"], cfg["architecture"]), ("linux", "amd64")),
    "created": (cfg["created"], "1970-01-01T00:00:00Z"),
}
for k, (got, exp) in checks.items():
    if got != exp:
        fail(f"config {k} is {got!r}, want {exp!r}")
print(f"[verify-image {name}] config: User {c['User']}, Entrypoint {c['Entrypoint']}, Cmd {c.get('Cmd')}, layer sha256:{lsha[:12]}")
PY
LAYER="$(ls "$W"/archive/*/layer.tar)"

# the layer's entries: owner, mtime, order, the binary, no shell
tar -tvf "$LAYER" > "$W/listing"
awk '{ if ($2 != "0/0") { print "owner " $2 ": " $0; bad=1 } if ($4 != "1970-01-01") { print "mtime: " $0; bad=1 } } END { exit bad }' "$W/listing" ||
  die "layer entries with another owner than 0/0 or mtime than 0 (above)"
tar -tf "$LAYER" > "$W/names"
LC_ALL=C sort -c "$W/names" 2> /dev/null || die "layer entries are not sorted by name"
grep -Eq "^-rwxr-xr-x 0/0 +[0-9]+ 1970-01-01 00:00 \./usr/local/bin/$NAME\$" "$W/listing" ||
  die "no ./usr/local/bin/$NAME (0755, 0/0) in the layer: $(cat "$W/names" | tr '\n' ' ')"
if grep -Eq '(^|/)(sh|bash|dash|ash|busybox)$' "$W/names"; then die "the image holds a shell: $(grep -E '(sh|busybox)$' "$W/names")"; fi
log "layer: $(wc -l < "$W/names") entries, owner 0/0, mtime 0, sorted; $(grep -c . "$W/listing") listed; no shell"

# run it from the image's root filesystem, as the image's user
tar -xf "$LAYER" -C "$W/root"
run() { timeout 20 chroot --userspec=65532:65532 "$W/root" "/usr/local/bin/$NAME" "$@" 2>&1 || true; }
VERSION_OUT="$(run --version)"
echo "$VERSION_OUT" | grep -q "$NAME" || die "--version in the image's root did not run: $VERSION_OUT"
log "runs in its own root as uid 65532: $VERSION_OUT"

# what a kubelet puts in every container: /etc/hosts and /etc/resolv.conf
printf '127.0.0.1 localhost\n127.0.0.1 files-only.test\n' > "$W/root/etc/hosts"
printf 'nameserver 127.0.0.153\noptions timeout:2 attempts:1\n' > "$W/root/etc/resolv.conf"
: > "$W/dns.log"
python3 "$HERE/fake_dns.py" 127.0.0.153 53 "$W/dns.log" &
DNS_PID=$!
for _ in $(seq 50); do grep -q ready "$W/dns.log" && break; sleep 0.1; done
grep -q ready "$W/dns.log" || die "fake_dns.py did not start (port 53 on 127.0.0.153 taken?)"

# connect to HOST:1 with the image's binary; prints what it says
connect() {
  local host=$1
  case "$NAME" in
    mx-pod)
      # the admin client (reqwest; its default resolver is getaddrinfo, like the replay client's
      # TcpStream::connect("primary:25"))
      run queue list --admin "http://$host:1" ;;
    backupmx-operator)
      # the Kubernetes client (hyper's getaddrinfo resolver) against a kubeconfig naming HOST
      cat > "$W/root/tmp/kubeconfig" << KC
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://$host:1", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
KC
      chmod 644 "$W/root/tmp/kubeconfig"
      KUBECONFIG=/tmp/kubeconfig run --log-format text run --identity verify --leader-elect=false ;;
  esac
}
refused() { echo "$1" | grep -qi "connection refused"; }
out_files="$(connect files-only.test)"
refused "$out_files" || die "files-only.test (/etc/hosts) was not reached: $out_files"
log "NSS files: files-only.test -> 127.0.0.1, connection refused (lookup worked)"
out_dns="$(connect dns-only.test)"
refused "$out_dns" || die "dns-only.test (DNS) was not reached: $out_dns"
grep -q "query dns-only.test type 1" "$W/dns.log" || die "the DNS server saw no query for dns-only.test"
log "NSS dns: dns-only.test -> 127.0.0.1 via $(grep -c 'query dns-only.test' "$W/dns.log") DNS question(s), connection refused (lookup worked)"
out_nx="$(connect nxdomain.test)"
if refused "$out_nx"; then die "nxdomain.test connected: the lookup checks prove nothing"; fi
log "unknown name fails as a lookup error: $(echo "$out_nx" | grep -io 'failed to lookup[^"]*\|dns error[^"]*\|name or service not known\|no such host' | head -1)"
log "ok"
