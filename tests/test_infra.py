"""infra/ (cluster launcher, KubeRay manifests, Dockerfile), profiles/paper.yaml and
bench/plan_vggsound.py: contract tests on the files and the numbers they must agree on. Nothing
here starts Ray or reaches AWS or Kubernetes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import torch
import yaml

from pipeline.config import load_params
from pipeline.evaluation.official import PAPER_RUNS
from pipeline.models import AudioVisualTransformer, count_parameters
from pipeline.profiles import apply_profile
from pipeline.tokenizers.layout import ModalityLayout, TokenLayout
from pipeline.tokenizers.vqgan import IMAGENET_F16_1024, VGGSOUND_CODEBOOK

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
SHARED = "/mnt/shared"  # the shared volume, at the same path on every node
WORKSPACE = f"{SHARED}/visual-echoes"

VGGSOUND_TRAIN_CLIPS = 183_730  # official train.csv (docs/references.md, "VGGSound lists")
EPOCHS = 1000  # paper §4
# bench/README.md: the paper model with activation checkpointing at 32 per GPU needs about 9 GiB,
# within a 16 GB V100 (an estimate from a CPU count, not measured on a GPU).
V100_MAX_BATCH_PER_GPU = 32
# V100 16 GB per AWS instance type.
AWS_V100S = {"p3.2xlarge": 1, "p3.8xlarge": 4, "p3.16xlarge": 8}


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def kuberay() -> dict[str, list[dict]]:
    """Every KubeRay document by kind (base.yaml, raycluster.yaml, rayjob.yaml)."""
    by_kind: dict[str, list[dict]] = {}
    for path in sorted((INFRA / "kuberay").glob("*.yaml")):
        for doc in _yaml_docs(path):
            by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    params = tmp_path_factory.mktemp("paper") / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    apply_profile(ROOT / "profiles" / "paper.yaml", params)
    return load_params(params)


def _cluster_specs(kuberay: dict[str, list[dict]]) -> dict[str, dict]:
    """RayCluster specs by name: the RayCluster's and each RayJob's own."""
    specs = {d["metadata"]["name"]: d["spec"] for d in kuberay["RayCluster"]}
    specs |= {d["metadata"]["name"]: d["spec"]["rayClusterSpec"] for d in kuberay["RayJob"]}
    return specs


def _gpu_limit(group: dict) -> int:
    (container,) = [c for c in group["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def _gpu_groups(spec: dict) -> list[dict]:
    return [g for g in spec["workerGroupSpecs"] if _gpu_limit(g)]


# ----------------------------------------------------------------------------- cluster launcher


def test_launcher_config_validates_against_rays_own_schema(launcher):
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(launcher, json.loads(schema_path.read_text()))
    # What `ray up` checks next, before it reaches AWS: defaults merged, node types, min/max.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher))


def test_launcher_has_a_cpu_head_v100_workers_token_auth_and_the_shared_volume(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head["node_config"]["InstanceType"] not in AWS_V100S
    others = {k: v for k, v in types.items() if k != launcher["head_node_type"]}
    workers = {k: v for k, v in others.items() if "GPU" in v["resources"]}
    (cpu,) = [v for k, v in others.items() if k not in workers]  # download and extract
    assert cpu["min_workers"] == 0 and cpu["resources"]["CPU"] >= 1
    assert sum(w["max_workers"] for w in others.values()) <= launcher["max_workers"]
    assert {w["node_config"]["InstanceType"] for w in workers.values()} == {
        "p3.8xlarge",
        "p3.16xlarge",
    }
    for w in workers.values():
        assert w["resources"]["GPU"] == AWS_V100S[w["node_config"]["InstanceType"]]
        assert w.get("min_workers", 0) == 0, "GPU nodes idle through download and extract"
    assert sum(w["max_workers"] for w in workers.values()) <= launcher["max_workers"]

    docker = launcher["docker"]
    options = " ".join(docker["run_options"])
    assert docker["image"].endswith(":cu126")
    assert "RAY_AUTH_MODE=token" in options
    assert f"-v {SHARED}:{SHARED}" in options
    assert f"PYTHONPATH={WORKSPACE}" in options
    assert "~/.ray/auth_token" in launcher["file_mounts"]
    assert any(f" {SHARED}" in c and "mount " in c for c in launcher["initialization_commands"])
    assert any("pipeline.media --check" in c for c in launcher["setup_commands"])
    assert any("mlflow server" in c for c in launcher["head_start_ray_commands"])


# -------------------------------------------------------------------------------------- KubeRay


def test_kuberay_manifests_have_what_the_operator_requires(kuberay):
    (cluster,) = kuberay["RayCluster"]
    (job,) = kuberay["RayJob"]
    for doc in (cluster, job):
        assert doc["apiVersion"] == "ray.io/v1"
        assert doc["metadata"]["name"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert "dvc repro" in job["spec"]["entrypoint"]
    assert "clusterSelector" not in job["spec"]

    for name, spec in _cluster_specs(kuberay).items():
        assert spec["rayVersion"] == ray.__version__, f"{name}: cluster and client Ray differ"
        assert spec["authOptions"] == {"mode": "token"}, name
        head = spec["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict)
        assert head["template"]["spec"]["containers"][0]["image"]
        assert spec["workerGroupSpecs"], name
        for group in spec["workerGroupSpecs"]:
            for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "template"):
                assert key in group, f"{name}: worker group without {key}"
            assert isinstance(group["rayStartParams"], dict)
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert _gpu_groups(spec), name
        for group in _gpu_groups(spec):
            assert (
                group["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
                in AWS_V100S
            )


def _named(docs: list[dict], name: str) -> dict:
    (doc,) = [d for d in docs if d["metadata"]["name"] == name]
    return doc


def test_kuberay_pods_mount_the_shared_claim_and_log_to_the_mlflow_service(kuberay):
    claim = _named(kuberay["PersistentVolumeClaim"], "visual-echoes-shared")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    service = _named(kuberay["Service"], "visual-echoes-mlflow")
    (account,) = kuberay["ServiceAccount"]
    for name, spec in _cluster_specs(kuberay).items():
        for pod in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod_spec = pod["template"]["spec"]
            assert pod_spec["serviceAccountName"] == account["metadata"]["name"]
            claims = {
                v["name"]: v["persistentVolumeClaim"]["claimName"]
                for v in pod_spec["volumes"]
                if "persistentVolumeClaim" in v
            }
            container = pod_spec["containers"][0]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert claims[mounts[SHARED]] == claim["metadata"]["name"], name
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["PYTHONPATH"] == WORKSPACE
            assert env["MLFLOW_TRACKING_URI"].startswith(f"http://{service['metadata']['name']}:")


def test_the_rayjob_runs_the_rayclusters_pods_with_a_fixed_gpu_group(kuberay):
    specs = _cluster_specs(kuberay)
    cluster, job = specs["visual-echoes"], specs["visual-echoes-paper"]
    head = lambda s: s["headGroupSpec"]["template"]["spec"]  # noqa: E731
    assert head(job) == head(cluster)
    assert job["headGroupSpec"]["rayStartParams"] == cluster["headGroupSpec"]["rayStartParams"]
    # The RayJob has the GPU group only: download and extract ran on the RayCluster before.
    for ours, theirs in zip(job["workerGroupSpecs"], _gpu_groups(cluster), strict=True):
        assert ours["groupName"] == theirs["groupName"]
        assert ours["template"] == theirs["template"]
        assert (
            ours["minReplicas"] == ours["replicas"] == ours["maxReplicas"] == theirs["maxReplicas"]
        )


# ------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_installs_the_lock_on_cis_python_then_a_v100_torch_from_the_cu126_index():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^FROM nvidia/cuda:12\.6\.\d+-cudnn-runtime-ubuntu2[24]\.04$", text, re.M)
    assert "https://download.pytorch.org/whl/cu126" in text
    (torch,) = re.findall(r'^ARG TORCH_SPEC="?(torch==[\d.]+)"?$', text, re.M)
    major, minor, _ = map(int, torch.removeprefix("torch==").split("."))
    assert (major, minor) <= (2, 14), "CUDA 12.6 wheels after 2.14 may lack V100 (sm_70) kernels"
    assert f"TORCH_SPEC={torch} " in makefile, "the Makefile's V100 line installs the image's torch"
    assert "sm_70" in text
    # CI's Python minor version (the Makefile's, which the locks are resolved for).
    (python,) = re.findall(r"^PYTHON_MINOR := (\S+)$", makefile, re.M)
    assert re.search(rf"^ARG PYTHON_MINOR={re.escape(python)}$", text, re.M)
    # The lock with hashes, then torch, then the package without dependencies, then pip check.
    steps = [
        "pip install --require-hashes --no-deps -r requirements/cu126.txt",
        'pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"',
        "pip install --no-deps --no-build-isolation .",
        "pip check",
    ]
    assert all(s in text for s in steps) and sorted(steps, key=text.index) == steps
    assert "requirements/cu126.txt" in (INFRA / "docker" / "Dockerfile.dockerignore").read_text()
    # No system ffmpeg: the stages run the lock's imageio-ffmpeg binary.
    assert not re.search(r"apt-get install[^\n]*(\\\n[^\n]*)*\bffmpeg\b", text)


def _ray_pins() -> dict[str, set[str]]:
    """Every place that pins Ray, with the version(s) it names."""
    text = lambda *parts: (ROOT.joinpath(*parts)).read_text()  # noqa: E731
    pins: dict[str, set[str]] = {}
    pins["pyproject.toml"] = set(re.findall(r'"ray\[[^\]]*\]==([^"]+)"', text("pyproject.toml")))
    for lock in ("cpu", "cu126"):
        pins[f"requirements/{lock}.txt"] = set(
            re.findall(r"^ray==(\S+)", text("requirements", f"{lock}.txt"), re.M)
        )
    pins["Dockerfile"] = set(
        re.findall(r"^ARG RAY_VERSION=(\S+)$", text("infra/docker/Dockerfile"), re.M)
    )
    for path in sorted((INFRA / "kuberay").glob("*.yaml")):
        found = re.findall(r'rayVersion: "([^"]+)"', path.read_text())
        if found:
            pins[f"kuberay/{path.name}"] = set(found)
    launcher = yaml.safe_load(text("infra/aws/cluster.yaml"))
    pins["aws/cluster.yaml"] = {
        m
        for c in launcher["setup_commands"]
        for m in re.findall(r"ray.__version__ == '([^']+)'", c)
    }
    return pins


def test_one_ray_version_everywhere():
    """The client (pyproject, the locks), the image, the KubeRay clusters and the launcher's node
    check name one Ray, and the installed client is it."""
    pins = _ray_pins()
    assert set(pins) >= {"kuberay/raycluster.yaml", "kuberay/rayjob.yaml"}
    assert all(len(v) == 1 for v in pins.values()), f"not one version each: {pins}"
    versions = {k: next(iter(v)) for k, v in pins.items()}
    assert len(set(versions.values())) == 1, f"Ray versions disagree: {versions}"
    assert ray.__version__ == versions["pyproject.toml"], "this venv's Ray is not the pinned one"


def test_mlflow_runs_on_postgresql_with_s3_artifacts(launcher, kuberay):
    """No SQLite store on the cluster (unreliable on NFS with many writers): the launcher's
    MLflow server reads a PostgreSQL URI from a file, KubeRay's from its PostgreSQL Service."""
    infra_text = "".join(p.read_text() for p in sorted(INFRA.rglob("*.yaml")))
    assert "sqlite:/" not in infra_text.lower()  # a store URI, not the word in a comment
    (server,) = [c for c in launcher["head_start_ray_commands"] if "mlflow server" in c]
    assert ". /mnt/shared/mlflow/backend.env" in server and "set -a" in server
    assert "--backend-store-uri" not in server  # MLFLOW_BACKEND_STORE_URI from the file
    assert "--artifacts-destination s3://" in server

    deployments = kuberay["Deployment"]
    db = _named(deployments, "visual-echoes-mlflow-db")["spec"]["template"]["spec"]
    (postgres,) = db["containers"]
    assert re.fullmatch(r"postgres:15(\.\d+)?", postgres["image"])
    env = {e["name"]: e for e in postgres["env"]}
    claim = _named(kuberay["PersistentVolumeClaim"], "visual-echoes-mlflow-db")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    (volume,) = [
        v
        for v in db["volumes"]
        if v["persistentVolumeClaim"]["claimName"] == "visual-echoes-mlflow-db"
    ]
    (mount,) = [m for m in postgres["volumeMounts"] if m["name"] == volume["name"]]
    assert env["PGDATA"]["value"].startswith(mount["mountPath"] + "/")
    db_service = _named(kuberay["Service"], "visual-echoes-mlflow-db")
    assert (
        db_service["spec"]["selector"]
        == _named(deployments, "visual-echoes-mlflow-db")["spec"]["selector"]["matchLabels"]
    )

    mlflow = _named(deployments, "visual-echoes-mlflow")["spec"]["template"]["spec"]
    (container,) = mlflow["containers"]
    assert container["command"] == ["mlflow", "server"]
    assert any(a.startswith("--artifacts-destination=s3://") for a in container["args"])
    store = {e["name"]: e for e in container["env"]}["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert re.fullmatch(
        r"postgresql://mlflow:\$\(DB_PASSWORD\)@visual-echoes-mlflow-db:5432/mlflow", store
    )
    secret = _named(kuberay["Secret"], "visual-echoes-mlflow-db")
    assert "password" in secret["stringData"]


# -------------------------------------------------------------------------------------- profiles


def test_both_profiles_apply_to_params_and_parse(tmp_path):
    for name in ("tiny", "paper"):
        params = tmp_path / f"{name}.yaml"
        params.write_text((ROOT / "params.yaml").read_text())
        apply_profile(ROOT / "profiles" / f"{name}.yaml", params)
        load_params(params)


def test_paper_profile_is_the_papers_data_tokenizers_and_decoding(paper):
    assert paper.download.source == "vggsound"
    assert paper.extract.image_size == 256
    for modality, official in (("image", IMAGENET_F16_1024), ("audio", VGGSOUND_CODEBOOK)):
        cfg = getattr(paper.tokenizers, modality)
        assert cfg.pretrained
        arch = dataclasses.asdict(cfg.arch)
        assert arch == {k: v for k, v in dataclasses.asdict(official).items() if k in arch}
    g = paper.generate
    assert (g.steps, g.temperature, g.guidance) == (30, 9.0, 3.0)
    assert paper.evaluate.max_clips == 0
    assert paper.evaluate.repeats == PAPER_RUNS == 2  # Table 1 averages two generation runs
    assert paper.tokenize.num_gpus_per_actor == 1
    assert paper.train.precision == "fp16"


def test_paper_profile_builds_the_paper_model(paper):
    down = 2 ** (len(paper.tokenizers.image.arch.ch_mult) - 1)
    ex = paper.extract
    layout = TokenLayout(
        ModalityLayout(
            "audio", paper.tokenizers.audio.arch.n_embed, (ex.n_mels // down, ex.mel_frames // down)
        ),
        ModalityLayout("image", paper.tokenizers.image.arch.n_embed, (ex.image_size // down,) * 2),
    )
    assert (layout.audio.grid, layout.image.grid) == ((5, 53), (16, 16))
    m = paper.model  # the paper's Table 6 (the docs/references.md "Model" rows)
    assert (m.embed_dim, m.depth, m.num_heads) == (1024, 24, 16)
    assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads) == (1024, 8, 16)
    with torch.device("meta"):
        assert count_parameters(AudioVisualTransformer(m, layout)) == 407_309_313 + 1_050_623


def test_paper_profile_scales_to_the_clusters_in_infra(paper, launcher, kuberay):
    train = paper.train
    assert train.use_gpu and paper.model.activation_checkpointing
    assert train.batch_size % train.num_workers == 0
    assert train.batch_size // train.num_workers <= V100_MAX_BATCH_PER_GPU
    workers = [
        t for name, t in launcher["available_node_types"].items()
        if name != launcher["head_node_type"]
    ]  # fmt: skip
    launcher_gpus = sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in workers)
    cpu_nodes = sum(t["max_workers"] for t in workers if "GPU" not in t["resources"])
    assert paper.download.executor == paper.extract.executor == "ray"
    assert paper.download.ray.nodes <= cpu_nodes  # one downloader per CPU node
    for name, spec in _cluster_specs(kuberay).items():
        if name == "visual-echoes":
            groups = [g for g in spec["workerGroupSpecs"] if not _gpu_limit(g)]
            assert paper.download.ray.nodes <= sum(g["maxReplicas"] for g in groups)
    assert train.num_workers == launcher_gpus
    for name, spec in _cluster_specs(kuberay).items():
        gpus = sum(g["maxReplicas"] * _gpu_limit(g) for g in spec["workerGroupSpecs"])
        assert train.num_workers == gpus, name
    assert paper.tokenize.num_actors * paper.tokenize.num_gpus_per_actor <= train.num_workers
    assert abs(train.steps - EPOCHS * VGGSOUND_TRAIN_CLIPS / train.batch_size) <= 1
    assert train.warmup_steps < train.steps


def test_paper_paths_are_on_the_shared_volume_or_one_bucket(paper):
    profile = (ROOT / "profiles" / "paper.yaml").read_text()
    local = re.findall(r":\s+(/\S+)", profile)
    assert local and all(p.startswith(f"{SHARED}/") for p in local)
    assert paper.train.storage_path.startswith("s3://")
    assert paper.tokenize.output_uri.startswith("s3://")
    infra = "".join(p.read_text() for p in sorted(INFRA.rglob("*.yaml")))
    buckets = set(re.findall(r"s3://([^/\s]+)/", profile + infra))
    assert len(buckets) == 1, f"one bucket everywhere (README: replace it once), got {buckets}"


# ----------------------------------------------------------------------------------- the sizing


@pytest.fixture(scope="module")
def plan_vggsound():
    """bench/plan_vggsound.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "plan_vggsound", ROOT / "bench" / "plan_vggsound.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _plan(module, capsys, *args: str) -> dict[str, list[float]]:
    assert module.main(list(args)) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header, *body = ([c.strip() for c in r.strip("|").split("|")] for r in rows)
    assert header[:6] == ["stage", "disk (GB)", "work", "unit", "wall (h)", "resources"]
    return {r[0]: [float(r[i].replace(",", "")) for i in (1, 2, 4)] for r in body}


def test_plan_has_a_row_per_stage_and_scales_with_the_clips(plan_vggsound, capsys):
    base = _plan(plan_vggsound, capsys, "--train-clips", "100000", "--test-clips", "10000")
    double = _plan(plan_vggsound, capsys, "--train-clips", "200000", "--test-clips", "20000")
    stages = ["download", "extract", "tokenize", "train (V100)", "train (H100)", "evaluate"]
    assert list(base) == stages
    for stage in stages:
        disk, work, wall = base[stage]
        assert work > 0 and wall > 0
        d_disk, d_work, d_wall = double[stage]
        assert d_work == pytest.approx(2 * work, rel=0.01)
        assert d_wall == pytest.approx(2 * wall, rel=0.01)
        # Checkpoints do not grow with the data.
        assert d_disk == pytest.approx(disk if stage.startswith("train") else 2 * disk, rel=0.01)


def test_plan_download_time_divides_by_the_download_nodes(plan_vggsound, capsys):
    one = _plan(plan_vggsound, capsys, "--download-nodes", "1")
    for nodes in (4, 16):
        more = _plan(plan_vggsound, capsys, "--download-nodes", str(nodes))
        assert more["download"][1] == one["download"][1]  # the same work
        assert more["download"][2] == pytest.approx(one["download"][2] / nodes, rel=0.01)
        assert more["extract"] == one["extract"]


# ---------------------------------------------------------------------------- the bench machine

ZEN1_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma

processor\t: 1
model name\t: something else
"""


def test_bench_machine_names_the_cpu_generation_behind_one_model_name():
    """Two boxes both called "AMD EPYC" ran the same `dvc repro` in 25 and 8.4 minutes: the
    bench scripts' machine line must tell them apart."""
    spec = importlib.util.spec_from_file_location("machine", ROOT / "bench" / "machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    zen1 = module.cpuinfo_fields(ZEN1_CPUINFO)
    assert module.cpu_description(zen1) == "AMD EPYC (family 23 model 1: Zen 1, AVX2)"
    zen5 = {**zen1, "cpu family": "26", "model": "2", "flags": "avx2 avx512f"}
    assert module.cpu_description(zen5) == "AMD EPYC (family 26 model 2: Zen 5, AVX-512)"
    assert module.amd_generation(0x17, 0x31) == "Zen 2"
    assert module.amd_generation(0x19, 0x61) == "Zen 4"
    intel = {**zen1, "vendor_id": "GenuineIntel", "cpu family": "6", "model": "143"}
    intel["model name"] = "Intel Xeon"
    assert module.cpu_description(intel) == "Intel Xeon (family 6 model 143: Sapphire Rapids, AVX2)"
    # A virtual machine's bare model name: the family and model still say which generation.
    vm = {**intel, "model name": "Intel(R) Xeon(R) Processor", "model": "167", "flags": "avx512f"}
    assert module.cpu_description(vm) == (
        "Intel(R) Xeon(R) Processor (family 6 model 167: Rocket Lake, AVX-512)"
    )
    unknown = {**intel, "model": "250"}
    assert module.cpu_description(unknown) == "Intel Xeon (family 6 model 250: AVX2)"
    assert module.cpu_description({"model name": "Apple M2"}) == "Apple M2"
