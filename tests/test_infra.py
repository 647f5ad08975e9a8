"""Checks of infra/: the hardened Ray cluster launcher config
(cluster-hardened.yaml, rendered by render.sh), IAM and network rules, the
KubeRay manifest and start_mlflow.sh. No AWS account and no network are
needed: AWS calls go to moto's in-process mock, MLflow runs on loopback.
`ray up infra/cluster.yaml`, as typed, is tests/test_ray_up.py."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
CLUSTER_YAML = INFRA / "cluster-hardened.yaml"
RENDERED_CLUSTER = "cluster-hardened.yaml"  # its name under the render folder
RENDER = INFRA / "render.sh"
START_MLFLOW = INFRA / "start_mlflow.sh"
KUBERAY = INFRA / "kuberay" / "raycluster.yaml"
README = INFRA / "README.md"

RAY_VERSION = "2.60.0"
PLACEHOLDER = re.compile(r"__[A-Z0-9_]+__")

# Values used to render the templates in tests (moto's default account id).
TEST_VALUES = {
    "MIM_AWS_REGION": "us-east-1",
    "MIM_AWS_ACCOUNT_ID": "123456789012",
    "MIM_STUDY_BUCKET": "mim-test-bucket",
    "MIM_STUDY_PREFIX": "studies",
    "MIM_RELEASE": "v0.1.0",
    "MIM_AMI_ID": "ami-0123456789abcdef0",
    "MIM_KEY_NAME": "mim-ray",
    "MIM_SECURITY_GROUP_ID": "sg-0123456789abcdef0",
    "MIM_OPERATOR_CIDR": "203.0.113.7/32",
    "MIM_IMAGE": "123456789012.dkr.ecr.us-east-1.amazonaws.com/mim-scaling:v0.1.0",
    "MIM_EKS_OIDC_PROVIDER": "oidc.eks.us-east-1.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE",
    "MIM_K8S_NAMESPACE": "mim",
}


def load_cluster(path: Path = CLUSTER_YAML) -> dict:
    return yaml.safe_load(path.read_text())


def render(target: str, out_dir: Path, **overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIM_")}
    env.update(TEST_VALUES)
    env.update(overrides)
    env["MIM_RENDER_DIR"] = str(out_dir)
    return subprocess.run(
        ["bash", str(RENDER), target], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rendered")
    for target in ("aws", "k8s"):
        proc = render(target, out)
        assert proc.returncode == 0, proc.stderr
    return out


def ray_up_preflight(config: dict) -> dict:
    """What `ray up` does to the YAML before it needs AWS (see
    ray.autoscaler._private.commands.create_or_update_cluster/_bootstrap_config):
    fill defaults and merge setup commands, then validate against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def worker_types(config: dict) -> dict:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def start_commands(config: dict) -> list[str]:
    return config["head_start_ray_commands"] + config["worker_start_ray_commands"]


def all_commands(config: dict) -> list[str]:
    keys = ["initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"]
    return [c for k in keys for c in config.get(k, [])]


def test_installed_ray_is_the_pinned_one():
    import ray

    assert ray.__version__ == RAY_VERSION


# --------------------------------------------------------------------------
# Ray's own validation of the cluster launcher config
# --------------------------------------------------------------------------


def test_template_passes_ray_up_validation():
    prepared = ray_up_preflight(load_cluster())
    assert prepared["head_node_type"] == "head"
    # merge_setup_commands folded the common setup into the head's.
    assert prepared["head_setup_commands"][: len(prepared["setup_commands"])] == prepared["setup_commands"]


def test_render_fills_every_placeholder_and_stays_valid(rendered):
    for path in rendered.rglob("*"):
        if path.is_file():
            assert not PLACEHOLDER.search(path.read_text()), f"placeholder left in {path}"
    ray_up_preflight(load_cluster(rendered / RENDERED_CLUSTER))
    for path in (rendered / "iam").glob("*.json"):
        json.loads(path.read_text())
    json.loads((rendered / "aws" / "sg-ingress.json").read_text())


def test_render_refuses_missing_or_unsafe_values(tmp_path):
    proc = render("aws", tmp_path / "a", MIM_OPERATOR_CIDR="0.0.0.0/0")
    assert proc.returncode != 0 and "OPERATOR_CIDR" in proc.stderr
    proc = render("aws", tmp_path / "b", MIM_STUDY_BUCKET="")
    assert proc.returncode != 0 and "MIM_STUDY_BUCKET" in proc.stderr
    proc = render("aws", tmp_path / "c", MIM_STUDY_BUCKET="bad|name")
    assert proc.returncode != 0
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_every_placeholder_is_documented():
    readme = README.read_text()
    names = set()
    for path in INFRA.rglob("*"):
        if path.is_file() and "rendered" not in path.parts:
            names |= set(PLACEHOLDER.findall(path.read_text()))
    for name in names:
        bare = name.strip("_")
        var = bare if bare.startswith("MIM_") else f"MIM_{bare}"
        assert var in readme, f"{var} (for {name}) is not explained in infra/README.md"


@pytest.fixture()
def fake_aws(monkeypatch, tmp_path):
    pytest.importorskip("moto")
    # In-process mock only: drop endpoint overrides (e.g. a moto *server* that
    # another fixture of this session points AWS_ENDPOINT_URL at) and profiles.
    for key in list(os.environ):
        if key.startswith("AWS_ENDPOINT_URL") or key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
            monkeypatch.delenv(key)
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
    }.items():
        monkeypatch.setenv(key, value)
    from moto import mock_aws
    from ray.autoscaler._private.aws import config as aws_config, utils as aws_utils

    def clear_ray_boto_caches():  # Ray memoises boto3 clients/resources and subnet lookups
        aws_utils.resource_cache.cache_clear()
        aws_utils.client_cache.cache_clear()
        aws_config._get_subnets_or_die.cache_clear()

    clear_ray_boto_caches()
    with mock_aws():
        yield
    clear_ray_boto_caches()


def test_ray_bootstrap_and_node_launch_against_mock_aws(fake_aws, tmp_path):
    """Replays the AWS part of `ray up` (bootstrap_aws) and the autoscaler's
    node launches (AWSNodeProvider.create_node) on moto, with the IAM roles,
    instance profiles, bucket policy and security-group rules created from the
    files in infra/."""
    import boto3
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE

    ec2 = boto3.client("ec2", region_name="us-east-1")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    sg = ec2.create_security_group(GroupName="mim-ray", Description="mim", VpcId=vpc)["GroupId"]
    ec2.create_key_pair(KeyName=TEST_VALUES["MIM_KEY_NAME"])
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]

    out = tmp_path / "rendered"
    proc = render("aws", out, MIM_SECURITY_GROUP_ID=sg, MIM_AMI_ID=ami)
    assert proc.returncode == 0, proc.stderr

    ec2.authorize_security_group_ingress(
        GroupId=sg, IpPermissions=json.loads((out / "aws" / "sg-ingress.json").read_text())
    )
    iam = boto3.client("iam")
    trust = (out / "iam" / "ec2-trust-policy.json").read_text()
    for role, policies in {
        "mim-ray-head": ["study-bucket-access", "head-autoscaler"],
        "mim-ray-worker": ["study-bucket-access", "worker-no-infra-writes"],
    }.items():
        iam.create_role(RoleName=role, AssumeRolePolicyDocument=trust)
        for policy in policies:
            iam.put_role_policy(RoleName=role, PolicyName=policy,
                                PolicyDocument=(out / "iam" / f"{policy}.json").read_text())
        iam.create_instance_profile(InstanceProfileName=role)
        iam.add_role_to_instance_profile(InstanceProfileName=role, RoleName=role)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=TEST_VALUES["MIM_STUDY_BUCKET"])
    s3.put_bucket_policy(Bucket=TEST_VALUES["MIM_STUDY_BUCKET"],
                         Policy=(out / "iam" / "bucket-policy.json").read_text())

    config = bootstrap_aws(ray_up_preflight(load_cluster(out / RENDERED_CLUSTER)))

    # Ray kept our group and added no rule to it (it would add 0.0.0.0/0:22
    # to a group it creates itself); subnets were filled from the group's VPC.
    groups = ec2.describe_security_groups()["SecurityGroups"]
    assert [g["GroupId"] for g in groups if g["GroupName"] != "default"] == [sg]
    rules = next(g for g in groups if g["GroupId"] == sg)["IpPermissions"]
    cidrs = [r["CidrIp"] for p in rules for r in p["IpRanges"]]
    assert cidrs == [TEST_VALUES["MIM_OPERATOR_CIDR"]]
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"]["SecurityGroupIds"] == [sg]
        assert node_type["node_config"]["SubnetIds"]

    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    for name, node_type in config["available_node_types"].items():
        node_config = copy.deepcopy(node_type["node_config"])
        is_head = name == config["head_node_type"]
        if is_head:
            node_config.update(config.get("head_node", {}))
        provider.create_node(node_config, {TAG_RAY_NODE_KIND: "head" if is_head else "worker",
                                           TAG_RAY_USER_NODE_TYPE: name}, 1)

    launched = {}
    for reservation in ec2.describe_instances()["Reservations"]:
        for inst in reservation["Instances"]:
            tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
            launched[tags[TAG_RAY_USER_NODE_TYPE]] = inst
            assert tags["ray-cluster-name"] == "mim-scaling"  # what the head's IAM conditions on
            assert inst["MetadataOptions"]["HttpTokens"] == "required"
    assert set(launched) == set(config["available_node_types"])
    head = launched["head"]
    assert head.get("InstanceLifecycle") is None, "head must be on-demand"
    assert head["IamInstanceProfile"]["Arn"].endswith(":instance-profile/mim-ray-head")
    for name in worker_types(config):
        assert launched[name].get("InstanceLifecycle") == "spot"
        assert launched[name]["IamInstanceProfile"]["Arn"].endswith(":instance-profile/mim-ray-worker")


# --------------------------------------------------------------------------
# Cluster shape, network exposure, token auth
# --------------------------------------------------------------------------


def test_head_on_demand_with_driver_resource_and_no_gpu():
    config = load_cluster()
    head = config["available_node_types"][config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"], "head must be on-demand"
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU", 0) == 0
    assert head["resources"]["head_driver"] >= 1
    assert head.get("min_workers", 0) == 0


def test_gpu_workers_are_spot_and_scale_from_zero():
    config = load_cluster()
    workers = worker_types(config)
    assert workers
    gpus = set()
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] >= 1, name
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert node_type["resources"]["GPU"] >= 1, name
        assert "head_driver" not in node_type["resources"], name
        gpus.add(node_type["resources"]["GPU"])
    assert {1, 8} <= gpus, "need a single-GPU and an 8-GPU worker type"
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    assert config["provider"]["cache_stopped_nodes"] is False


def test_only_ssh_is_open_to_the_operator():
    config = load_cluster()
    # A provider.security_group makes Ray create a group with SSH open to
    # 0.0.0.0/0; every node type must use the pre-created group instead.
    assert "security_group" not in config["provider"]
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"]["SecurityGroupIds"] == ["__SECURITY_GROUP_ID__"], name
        assert "NetworkInterfaces" not in node_type["node_config"], name

    rules = json.loads((INFRA / "aws" / "sg-ingress.json").read_text())
    outside = [r for r in rules if r.get("IpRanges") or r.get("Ipv6Ranges") or r.get("PrefixListIds")]
    assert len(outside) == 1
    (ssh,) = outside
    assert (ssh["IpProtocol"], ssh["FromPort"], ssh["ToPort"]) == ("tcp", 22, 22)
    assert [r["CidrIp"] for r in ssh["IpRanges"]] == ["__OPERATOR_CIDR__"]
    assert not ssh.get("Ipv6Ranges") and not ssh.get("PrefixListIds")
    for rule in rules:
        if rule is not ssh:
            assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == ["__SECURITY_GROUP_ID__"]

    # Services on the head listen on loopback only (reached through SSH).
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in " ".join(all_commands(config))
    assert re.search(r'^MLFLOW_HOST="\$\{MLFLOW_HOST:-127\.0\.0\.1\}"$', START_MLFLOW.read_text(), re.M)


def test_token_auth_is_on_everywhere():
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR

    assert AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"
    config = load_cluster()
    ray_starts = [c for c in start_commands(config) if "ray start" in c]
    assert len(ray_starts) == 2
    for cmd in ray_starts:
        assert "RAY_AUTH_MODE=token ray start" in cmd, cmd
    assert "--head" in ray_starts[0] and "--head" not in ray_starts[1]
    # the 0-CPU head would otherwise start one process at a time for all trial drivers
    assert "RAY_worker_maximum_startup_concurrency=16 " in ray_starts[0]
    # Token file distributed by path (generated by `ray get-auth-token --generate`).
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    for cmds in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("test -s ~/.ray/auth_token" in c for c in cmds)
    assert "'export RAY_AUTH_MODE=token'" in config["setup_commands"][0]


def test_ray_honours_the_auth_mode_setting():
    code = ("from ray._raylet import get_authentication_mode, AuthenticationMode;"
            "print(get_authentication_mode() == AuthenticationMode.TOKEN)")
    env = dict(os.environ, RAY_AUTH_MODE="token")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr


def test_pinned_versions_match_the_project():
    pyproject = (ROOT / "pyproject.toml").read_text()
    pins = set(re.findall(r'"ray\[[a-z,]+\]==([0-9.]+)"', pyproject))
    assert pins == {RAY_VERSION}
    setup = " ".join(load_cluster()["setup_commands"])
    assert f'"ray[default,tune,train]=={RAY_VERSION}"' in setup
    assert "--python 3.11" in setup
    assert "$MIM_RELEASE_URI" in setup  # pinned release bundle, not a moving branch
    assert f"rayproject/ray:{RAY_VERSION}-py311" in (INFRA / "kuberay" / "Dockerfile").read_text()


def test_every_node_command_is_valid_bash():
    for cmd in all_commands(load_cluster()):
        proc = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd!r}: {proc.stderr}"
    for script in (RENDER, START_MLFLOW):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_node_environment_file(rendered, tmp_path):
    """Runs the first two setup commands in a throw-away HOME (twice: they must
    be idempotent) and reads the environment every later command gets."""
    config = load_cluster(rendered / RENDERED_CLUSTER)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# stock bashrc\n")
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    for _ in range(2):
        for cmd in config["setup_commands"][:2]:
            subprocess.run(["bash", "-c", cmd], env=env, check=True, timeout=30)
    assert (home / ".bashrc").read_text().count("source ~/.mim_env") == 1
    out = subprocess.run(["bash", "-c", "source ~/.mim_env && env"], env=env, check=True,
                         capture_output=True, text=True).stdout
    got = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    bucket, prefix = TEST_VALUES["MIM_STUDY_BUCKET"], TEST_VALUES["MIM_STUDY_PREFIX"]
    assert got["RAY_AUTH_MODE"] == "token"
    assert got["MIM_STORAGE_URI"] == f"s3://{bucket}/{prefix}"
    assert got["MIM_RELEASE"] == TEST_VALUES["MIM_RELEASE"]
    assert got["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert got["MLFLOW_ARTIFACTS_DESTINATION"].startswith(f"s3://{bucket}/")
    assert got["PATH"].startswith(f"{home}/mim-venv/bin:")


# --------------------------------------------------------------------------
# IAM: the study bucket only
# --------------------------------------------------------------------------


def _statements(path: Path) -> list[dict]:
    doc = json.loads(path.read_text())
    assert doc["Version"] == "2012-10-17"
    return doc["Statement"]


def _as_list(value):
    return value if isinstance(value, list) else [value]


def test_iam_reaches_only_the_study_bucket():
    bucket_arns = {"arn:aws:s3:::__STUDY_BUCKET__", "arn:aws:s3:::__STUDY_BUCKET__/*"}
    for path in (INFRA / "iam").glob("*.json"):
        for st in _statements(path):
            actions = _as_list(st["Action"])
            if st["Effect"] == "Allow":
                assert "*" not in actions and "s3:*" not in actions, path.name
            if any(a.startswith("s3:") for a in actions):
                resources = set(_as_list(st["Resource"]))
                if st["Effect"] == "Deny":  # a deny may narrow to a part of the bucket
                    assert all(r.split("/")[0] == "arn:aws:s3:::__STUDY_BUCKET__" for r in resources), (path.name, st)
                else:
                    assert resources <= bucket_arns, (path.name, st)

    access = _statements(INFRA / "iam" / "study-bucket-access.json")
    assert {r for st in access for r in _as_list(st["Resource"])} == bucket_arns
    assert all(a.startswith("s3:") for st in access for a in _as_list(st["Action"]))


def test_node_setup_pins_every_package_it_installs():
    """What a node installs is what the tests ran with: the project's whole
    dependency closure pinned in infra/constraints.txt, used by every install."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (INFRA / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    todo, seen = [("mim-scaling", ())], set()
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), tuple(sorted(extras)))
        if key in seen:
            continue
        seen.add(key)
        dist = distribution(name)
        if key[0] != "mim-scaling":
            assert pins.get(key[0]) == dist.version, f"{name} {dist.version} is not pinned as tested"
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                todo.append((req.name, tuple(req.extras)))
    setup = "\n".join(str(c) for c in load_cluster()["setup_commands"])
    assert "-c ~/mim.new/infra/constraints.txt" in setup
    assert "--build-constraints ~/mim.new/infra/constraints.txt" in setup
    assert "uv tool install awscli==" in setup and "MIM_UV_VERSION=0." in setup
    assert "-c /home/ray/mim/infra/constraints.txt" in (INFRA / "kuberay" / "Dockerfile").read_text()


def test_workers_cannot_write_what_every_node_installs_or_the_mlflow_backup():
    config = load_cluster()
    deny = _statements(INFRA / "iam" / "worker-no-infra-writes.json")
    assert [st["Effect"] for st in deny] == ["Deny"]
    assert {"s3:PutObject", "s3:DeleteObject"} <= set(deny[0]["Action"])
    assert deny[0]["Resource"] == "arn:aws:s3:::__STUDY_BUCKET__/_infra/*"
    env = "\n".join(str(c) for c in config["setup_commands"])
    for var in ("MIM_RELEASE_URI", "MLFLOW_DB_BACKUP_URI", "MLFLOW_ARTIFACTS_DESTINATION"):
        assert f"export {var}=s3://__STUDY_BUCKET__/_infra/" in env, var  # all under the denied prefix
    readme = (INFRA / "README.md").read_text()
    assert "--role-name mim-ray-worker --policy-name no-infra-writes" in readme


def test_head_policy_matches_the_cluster():
    config = load_cluster()
    statements = {st["Sid"]: st for st in _statements(INFRA / "iam" / "head-autoscaler.json")}
    assert not any(a.startswith("s3:") for st in statements.values() for a in _as_list(st["Action"]))

    launch = statements["LaunchOnlyTheClusterWorkerInstanceTypes"]
    allowed = set(launch["Condition"]["StringEquals"]["ec2:InstanceType"])
    assert allowed == {t["node_config"]["InstanceType"] for t in worker_types(config).values()}

    manage = statements["ManageOnlyThisClustersInstances"]
    assert "ec2:TerminateInstances" in manage["Action"]
    assert manage["Condition"]["StringEquals"]["aws:ResourceTag/ray-cluster-name"] == config["cluster_name"]

    passrole = statements["PassOnlyTheWorkerRole"]
    assert passrole["Resource"] == "arn:aws:iam::__AWS_ACCOUNT_ID__:role/mim-ray-worker"
    for name, node_type in config["available_node_types"].items():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        role = "mim-ray-head" if name == config["head_node_type"] else "mim-ray-worker"
        assert arn == f"arn:aws:iam::__AWS_ACCOUNT_ID__:instance-profile/{role}"


# --------------------------------------------------------------------------
# No secrets in infra/
# --------------------------------------------------------------------------

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key name": re.compile(r"aws_secret_access_key", re.I),
    "secret key value": re.compile(r"secret[_-]?(access[_-]?)?key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{20,}", re.I),
    "password assignment": re.compile(r"pass(word|wd)?\s*[=:]\s*['\"]?[^\s'\"$<{*]{3,}", re.I),
    "credentials in a URI": re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:(?!\*\*\*@)[^/\s@'\"]+@", re.I),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "Ray token value": re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?[A-Za-z0-9_-]{8,}"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
}


def infra_files() -> list[Path]:
    return [p for p in INFRA.rglob("*") if p.is_file() and "rendered" not in p.parts
            and "__pycache__" not in p.parts]


def test_secret_scanner_catches_examples():
    key_id = "AKIA" + "ABCDEFGHIJKLMNOP"
    samples = [key_id, "aws_secret_" + "access_key = x", "password: hunter22",
               "postgresql://mlflow:s3cr3t" + "@db:5432/mlflow", "RAY_AUTH_TOKEN=" + "abcdef123456"]
    for sample in samples:
        assert any(p.search(sample) for p in SECRET_PATTERNS.values()), sample
    assert not any(p.search("postgresql://mlflow@db:5432/mlflow") for p in SECRET_PATTERNS.values())


def test_no_secrets_in_infra_files():
    files = infra_files()
    assert len(files) >= 10
    for path in files:
        text = path.read_text(errors="replace")
        for what, pattern in SECRET_PATTERNS.items():
            match = pattern.search(text)
            assert not match, f"{what} in {path.relative_to(ROOT)}: {match.group(0)!r}"
        assert path.name != "auth_token" and not path.name.endswith(".pem")


# --------------------------------------------------------------------------
# KubeRay manifest
# --------------------------------------------------------------------------


def _docs(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return {d["kind"]: d for d in docs}


def _container(spec: dict, name: str) -> dict:
    return next(c for c in spec["containers"] if c["name"] == name)


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("which", ["template", "rendered"])
def test_kuberay_manifest_structure(which, rendered):
    path = KUBERAY if which == "template" else rendered / "kuberay" / "raycluster.yaml"
    docs = _docs(path)
    assert set(docs) == {"ServiceAccount", "PersistentVolumeClaim", "RayCluster"}
    sa, pvc, rc = docs["ServiceAccount"], docs["PersistentVolumeClaim"], docs["RayCluster"]
    assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]  # IRSA

    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True

    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    params = head["rayStartParams"]
    assert params["num-cpus"] == "0" and params["num-gpus"] == "0"
    resources = json.loads(json.loads(params["resources"]))  # KubeRay's quoted-JSON form
    assert resources["head_driver"] >= 1
    pod = head["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["containers"][0]["name"] == "ray-head"  # KubeRay treats the first as Ray's
    assert "nvidia.com/gpu" not in json.dumps(pod["containers"][0]["resources"])
    mlflow = _container(pod, "mlflow")
    assert mlflow["command"][-2:] == ["/home/ray/mim/infra/start_mlflow.sh", "run"]
    env = _env(mlflow)
    assert env["MLFLOW_HOST"] == "127.0.0.1" and env["MLFLOW_PORT"] == "5000"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert env["MLFLOW_BACKEND_URI"]["secretKeyRef"]["optional"] is True
    claim = next(v for v in pod["volumes"] if v["name"] == "mlflow-db")["persistentVolumeClaim"]["claimName"]
    assert claim == pvc["metadata"]["name"]
    assert _env(pod["containers"][0])["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"

    gpus_per_group = {}
    vm_types = {t["node_config"]["InstanceType"] for t in worker_types(load_cluster()).values()}
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["replicas"] == 0 and group["maxReplicas"] >= 1
        wpod = group["template"]["spec"]
        assert wpod["serviceAccountName"] == sa["metadata"]["name"]
        worker = _container(wpod, "ray-worker")
        limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
        assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] >= 1
        assert any(t["key"] == "nvidia.com/gpu" for t in wpod["tolerations"])
        assert wpod["nodeSelector"]["node.kubernetes.io/instance-type"] in vm_types
        gpus_per_group[group["groupName"]] = limits["nvidia.com/gpu"]
    assert sorted(gpus_per_group.values()) == [1, 8]

    assert "AWS_SECRET" not in path.read_text() and "aws_access_key" not in path.read_text().lower()


# --------------------------------------------------------------------------
# start_mlflow.sh, for real
# --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_script(env: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(START_MLFLOW), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.skipif(shutil.which("mlflow") is None, reason="mlflow CLI not installed")
def test_start_mlflow_script_runs_a_local_server(tmp_path):
    port = _free_port()
    home = tmp_path / "mlflow-home"
    env = dict(os.environ)
    for key in ("MLFLOW_BACKEND_URI", "MLFLOW_TRACKING_URI", "MLFLOW_HOST", "MLFLOW_PID_FILE",
                "MLFLOW_LOG_FILE", "MLFLOW_BACKEND_STORE_URI"):
        env.pop(key, None)
    env.update(MLFLOW_HOME=str(home), MLFLOW_PORT=str(port), MLFLOW_WORKERS="1",
               MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "artifacts"),
               MLFLOW_DB_BACKUP_URI=str(tmp_path / "backup" / "mlflow.db"),
               MLFLOW_START_TIMEOUT="180")
    base = f"http://127.0.0.1:{port}"
    pid = None
    try:
        started = _run_script(env, "start")
        assert started.returncode == 0, started.stdout + started.stderr
        pid = int((home / "mlflow.pid").read_text())
        with urllib.request.urlopen(f"{base}/health", timeout=10) as resp:
            assert resp.status == 200 and resp.read().strip() == b"OK"
        assert (home / "mlflow.db").exists()  # sqlite backend by default

        again = _run_script(env, "start")  # idempotent: no second server
        assert again.returncode == 0 and "already running" in again.stdout
        assert int((home / "mlflow.pid").read_text()) == pid
        assert _run_script(env, "status").returncode == 0

        req = urllib.request.Request(
            f"{base}/api/2.0/mlflow/experiments/create",
            data=json.dumps({"name": "infra-smoke"}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            experiment_id = json.loads(resp.read())["experiment_id"]
        assert experiment_id

        backup = _run_script(env, "backup")
        assert backup.returncode == 0, backup.stderr
        with sqlite3.connect(tmp_path / "backup" / "mlflow.db") as db:
            names = {row[0] for row in db.execute("select name from experiments")}
        assert "infra-smoke" in names

        stopped = _run_script(env, "stop", timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        deadline = time.time() + 20
        while _pid_alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not _pid_alive(pid)
        assert not (home / "mlflow.pid").exists()
        assert _run_script(env, "status").returncode == 3
        assert _run_script(env, "stop").returncode == 0  # stopping twice is fine
        pid = None
    finally:
        if pid is not None and _pid_alive(pid):  # clean up only what this test started
            _run_script(env, "stop", timeout=60)
