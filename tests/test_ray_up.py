"""`ray up infra/cluster.yaml`, as typed.

The committed file, unchanged, goes through Ray's own `ray up` command (the
click command itself: prepare_config, Ray's AWS resource fill-out,
validate_config, bootstrap_aws, the head's launch) against moto's standalone
AWS server on loopback, and stops where `ray up` would SSH to the new head.
Then the node setup the file carries is checked. No AWS account and no
network are needed.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "infra" / "cluster.yaml"
CONSTRAINTS = "~/mim/infra/constraints.txt"


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def prepared_cluster() -> dict:
    """The config as `ray up` holds it before it needs AWS: Ray's defaults
    filled in, common setup merged into the head's, checked against its schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load_cluster())
    validate_config(config)
    return config


def all_commands(config: dict) -> list[str]:
    keys = ["initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"]
    return [c for k in keys for c in config.get(k, [])]


# --------------------------------------------------------------------------
# `ray up` against moto
# --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def aws_server(tmp_path_factory):
    """moto's standalone server, on loopback, in a process of its own rather
    than the session's `s3_server`: moto loads AWS's managed policies (which
    Ray attaches to the role it makes) only into IAM backends it creates while
    MOTO_IAM_LOAD_MANAGED_POLICIES is set, and in this process moto's backends
    are shared with, and reset by, the tests that use moto's in-process mock."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"},
        stdout=subprocess.DEVNULL, stderr=log.open("wb"), start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class HeadLaunched(Exception):
    """Raised when `ray up` has its head node, where it would next SSH to it."""


@dataclass(frozen=True)
class RayUp:
    result: object  # click's Result of `ray up infra/cluster.yaml --yes --no-config-cache`
    head_resources: dict  # the head's Ray resources, as `ray up` detected them from its instance type
    home: Path
    endpoint: str
    region: str

    def client(self, service: str):
        import boto3

        return boto3.client(service, region_name=self.region, endpoint_url=self.endpoint,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def instances(self) -> list[dict]:
        return [i for r in self.client("ec2").describe_instances()["Reservations"] for i in r["Instances"]]


def _clear_ray_aws_caches() -> None:
    """Ray memoises boto3 clients (bound to the endpoint of their time), node
    providers and subnet lookups: none may cross into or out of this module."""
    from ray.autoscaler._private.aws import config as aws_config, utils as aws_utils
    from ray.autoscaler._private.providers import _clear_provider_cache

    aws_utils.resource_cache.cache_clear()
    aws_utils.client_cache.cache_clear()
    aws_config._get_subnets_or_die.cache_clear()
    _clear_provider_cache()


@pytest.fixture(scope="module")
def ray_up(aws_server, tmp_path_factory) -> RayUp:
    from click.testing import CliRunner
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.event_system import CreateClusterEvent, global_event_system
    from ray.scripts.scripts import up

    home = tmp_path_factory.mktemp("home")
    region = load_cluster()["provider"]["region"]
    head_resources = {}
    fillout = AWSNodeProvider.fillout_available_node_types_resources

    def record_head_resources(config):  # what Ray detects, kept from its own call
        filled = fillout(config)
        head_resources.update(filled["available_node_types"][filled["head_node_type"]]["resources"])
        return filled

    def stop_before_ssh(_event):
        raise HeadLaunched

    with pytest.MonkeyPatch.context() as patch:
        for key in list(os.environ):
            if key.startswith("AWS_"):
                patch.delenv(key)
        # Every boto3 client goes to moto through the SDK's own endpoint
        # variable, so Ray's client factory runs as it does on a laptop.
        patch.setenv("AWS_ENDPOINT_URL", aws_server)
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
        patch.setenv("HOME", str(home))  # Ray saves the key pair it makes under ~/.ssh
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        patch.chdir(ROOT)  # `ray up` runs from the repo root
        # Ray waits 2 x 15 s for a new IAM profile to propagate through AWS; moto has it at once.
        patch.setattr(aws_config, "time", SimpleNamespace(sleep=lambda seconds: None))
        patch.setattr(AWSNodeProvider, "fillout_available_node_types_resources",
                      staticmethod(record_head_resources))
        _clear_ray_aws_caches()
        global_event_system.add_callback_handler(CreateClusterEvent.head_node_acquired, stop_before_ssh)
        try:
            result = CliRunner().invoke(up, ["infra/cluster.yaml", "--yes", "--no-config-cache"])
        finally:
            global_event_system.clear_callbacks_for_event(CreateClusterEvent.head_node_acquired)
            _clear_ray_aws_caches()
    return RayUp(result, head_resources, home, aws_server, region)


def test_ray_up_as_typed_launches_the_head(ray_up):
    result = ray_up.result
    assert isinstance(result.exception, HeadLaunched), (
        f"{result.output[-3000:]}\n{result.exception!r}")

    instances = ray_up.instances()
    assert len(instances) == 1
    (head,) = instances
    tags = {t["Key"]: t["Value"] for t in head["Tags"]}
    config = load_cluster()
    node_config = config["available_node_types"][config["head_node_type"]]["node_config"]
    assert tags["ray-node-type"] == "head" and tags["ray-cluster-name"] == config["cluster_name"]
    assert tags["project"] == "mim-scaling"
    assert head["InstanceType"] == node_config["InstanceType"]
    assert head["ImageId"] == node_config["ImageId"]  # EC2 resolves the name at launch; moto keeps it
    assert head.get("InstanceLifecycle") is None, "the head must be on-demand"
    assert head["MetadataOptions"]["HttpTokens"] == "required"


def test_ray_made_the_key_pair_security_group_and_instance_profile(ray_up):
    (head,) = ray_up.instances()
    ec2, iam = ray_up.client("ec2"), ray_up.client("iam")

    key_name = f"ray-autoscaler_{ray_up.region}"
    assert head["KeyName"] == key_name
    assert ec2.describe_key_pairs(KeyNames=[key_name])["KeyPairs"]
    key_file = ray_up.home / ".ssh" / f"{key_name}.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600

    # SSH is the only way in from outside; the rest is traffic inside the group.
    (group,) = head["SecurityGroups"]
    assert group["GroupName"] == "ray-autoscaler-mim-scaling"
    rules = ec2.describe_security_groups(GroupIds=[group["GroupId"]])["SecurityGroups"][0]["IpPermissions"]
    outside = [r for r in rules if r.get("IpRanges") or r.get("Ipv6Ranges") or r.get("PrefixListIds")]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in outside] == [("tcp", 22, 22)]
    for rule in rules:
        if rule not in outside:
            assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [group["GroupId"]]

    assert head["IamInstanceProfile"]["Arn"].endswith(":instance-profile/ray-autoscaler-v1")
    (role,) = iam.get_instance_profile(InstanceProfileName="ray-autoscaler-v1")["InstanceProfile"]["Roles"]
    attached = iam.list_attached_role_policies(RoleName=role["RoleName"])["AttachedPolicies"]
    # S3 access is what lets the node reach the bucket named by --storage.
    assert {p["PolicyName"] for p in attached} == {"AmazonEC2FullAccess", "AmazonS3FullAccess"}


def test_every_study_cluster_profile_fits_on_the_node(ray_up):
    """A trial's Train workers must all fit on the one node (no workers join it)."""
    from orchestrator.planning import make_plan
    from orchestrator.study import load_study

    resources = ray_up.head_resources
    assert resources["head_driver"] >= 1 and resources["GPU"] >= 1
    checked = 0
    for path in sorted((ROOT / "studies").glob("*.py")):
        study = load_study(path)
        if "cluster" not in study.profiles:
            continue
        for cell in make_plan(study, "cluster", path).cells:
            cfg = cell.config
            assert cfg.use_gpu and cfg.workers <= resources["GPU"], (path.name, cell.id)
            assert cfg.workers * cfg.cpus_per_worker <= resources["CPU"], (path.name, cell.id)
            checked += 1
    assert checked


# --------------------------------------------------------------------------
# What the file names, and what it installs
# --------------------------------------------------------------------------


def test_nothing_of_an_account_is_named():
    """Ray makes the key pair, security group and instance profile; the bucket
    is given to `run --storage`; the region is a plain value."""
    text = CLUSTER_YAML.read_text()
    config = load_cluster()
    assert not re.search(r"__[A-Z0-9_]+__", text)
    assert re.fullmatch(r"[a-z]{2}(-[a-z]+)+-[0-9]", config["provider"]["region"])
    assert "arn:aws" not in text
    commands = " ".join(all_commands(config))
    assert "s3://" not in commands and "BUCKET" not in commands  # the bucket is `run --storage`'s
    assert "ssh_private_key" not in config["auth"] and "security_group" not in config["provider"]
    for node_type in config["available_node_types"].values():
        for key in ("KeyName", "SecurityGroupIds", "SubnetIds", "IamInstanceProfile", "NetworkInterfaces"):
            assert key not in node_type["node_config"], key


def test_the_checkout_reaches_the_node_and_installs_pinned():
    config = load_cluster()
    mounts = config["file_mounts"]
    for remote, local in mounts.items():
        assert (ROOT / local).exists(), f"{local} (for {remote}) is not in the checkout"
        assert remote == f"~/mim/{local}", remote
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert {"pyproject.toml", "infra", "studies", *packages} <= set(mounts.values())

    setup = config["setup_commands"]
    installs = [c for c in all_commands(config) if "install" in c and "install.sh" not in c]
    assert installs == [f"uv pip install --python ~/mim-venv/bin/python -c {CONSTRAINTS} "
                        f"--build-constraints {CONSTRAINTS} -e ~/mim"]
    assert re.search(r"'export MIM_UV_VERSION=[0-9]+\.[0-9]+\.[0-9]+'", setup[0])
    assert any('https://astral.sh/uv/${MIM_UV_VERSION}/install.sh' in c for c in setup)
    assert any("uv venv --python 3.11 " in c for c in setup)


def test_token_auth_is_on_and_services_listen_on_loopback():
    config = prepared_cluster()  # Ray's defaults included: none may start Ray without a token
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 1 and "--head" in starts[0]
    assert "RAY_AUTH_MODE=token ray start" in starts[0]
    assert "--dashboard-host=127.0.0.1" in starts[0]
    assert "0.0.0.0" not in " ".join(all_commands(config))
    # The token is made on the head and its value never reaches the `ray up` log.
    generate = [c for c in config["head_setup_commands"] if "get-auth-token" in c]
    assert generate == ["test -s ~/.ray/auth_token || ray get-auth-token --generate >/dev/null 2>&1"]
    assert "chmod 600 ~/.ray/auth_token" in config["head_setup_commands"]
    assert any(c == "bash ~/mim/infra/start_mlflow.sh start" for c in config["head_start_ray_commands"])


def test_every_node_command_is_valid_bash():
    for cmd in all_commands(load_cluster()):
        proc = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd!r}: {proc.stderr}"


def test_node_environment_file(tmp_path):
    """The first three setup commands, twice in a throw-away HOME (they must be
    idempotent), with a stand-in curl for the instance metadata service."""
    setup = load_cluster()["setup_commands"]
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    (home / ".bashrc").write_text("# stock bashrc\n")
    fake_curl = bin_dir / "curl"
    fake_curl.write_text('#!/bin/sh\ncase "$*" in *"-X PUT"*) echo tok ;; *"token: tok"*) echo eu-west-3 ;;'
                         ' *) exit 22 ;; esac\n')
    fake_curl.chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for _ in range(2):
        for cmd in setup[:3]:
            subprocess.run(["bash", "-c", cmd], env=env, check=True, timeout=30)
    assert (home / ".bashrc").read_text().count("source ~/.mim_env") == 1
    assert (home / ".mim_env").read_text().count("AWS_DEFAULT_REGION") == 1
    out = subprocess.run(["bash", "-c", "source ~/.mim_env && env"], env=env, check=True,
                         capture_output=True, text=True).stdout
    got = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert got["RAY_AUTH_MODE"] == "token"
    assert got["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert got["AWS_DEFAULT_REGION"] == "eu-west-3"
    assert got["PATH"].startswith(f"{home}/mim-venv/bin:{home}/.local/bin:")
    assert not any(k.startswith("MIM_STORAGE") or "s3://" in v for k, v in got.items())
