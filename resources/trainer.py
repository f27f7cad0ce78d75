"""The `trainer` resource: runs the training entry point `python -m dpo_driver.train` through Dagster Pipes.

mode "subprocess" (embedded default): this interpreter, on this machine.
mode "docker" (production): the training image (docker/Dockerfile) in a container with GPU device
requests. Every folder the job reads or writes is bind-mounted at the *same path*, so a path in the
job spec means the same file on both sides; when Dagster itself runs in a container, the artifact
root and the model cache must therefore sit at identical host and container paths (docker/README.md).
Assets call `train(context, spec_path)` and never learn which mode ran.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from pathlib import Path
from typing import Literal

import dagster as dg
import docker
import requests
from dagster._core.errors import DagsterPipesExecutionError  # what PipesSubprocessClient raises; not re-exported
from dagster._core.pipes.utils import extract_message_or_forward_to_stdout
from dagster_docker import PipesDockerClient
from dagster_docker.pipes import PipesDockerLogsMessageReader
from dagster_pipes import DagsterPipesError  # what PipesDockerClient raises on a non-zero exit

from dpo_driver.train import JobSpec

# tqdm bars are carriage-return noise in a log; progress comes through Pipes as log lines instead.
TRAIN_ENV = {"TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


class TrainingLauncher(dg.ConfigurableResource):
    """Launches LoRA SFT / DPO jobs via Dagster Pipes, as a local subprocess or in a (GPU) container."""

    mode: Literal["subprocess", "docker"] = "subprocess"
    image: str = "dpo-driver-train:latest"  # docker: the training image (docker/build_image.sh train)
    gpus: str = ""  # docker: "" = none (CPU), "all", or device ids "0,1"; needs the NVIDIA container toolkit
    volumes: list[str] = []  # docker: extra "host:container[:ro]" mounts; the job's own folders are automatic
    env: dict[str, str] = {}  # extra environment for the training process (HF_HOME, NCCL_*, ...)
    user: str = ""  # docker: "uid:gid" to run as; "" = this process's, so files on the shared mounts stay ours
    shm_size: str = "2g"  # docker: /dev/shm size (PyTorch data loader workers)
    network: str = ""  # docker: network to attach to; "" = Docker's default bridge
    engine_timeout_s: int = 10  # docker: an engine that does not answer within this fails the launch
    log_tail_lines: int = 40  # lines of the training log quoted in a failure

    def train(self, context: dg.AssetExecutionContext, spec_path: Path) -> dict:
        """Run the job; return its result {kind, adapter_dir, num_examples, metrics} as sent through Pipes.

        The calling asset must return a `MaterializeResult` (Pipes asks for a typed event stream).
        """
        spec_path = Path(spec_path).resolve()
        spec = JobSpec.load(spec_path)  # a bad spec fails here, before anything is launched
        log_file = spec_path.parent / f"{spec.kind}-train.log"
        args = ["-m", "dpo_driver.train", spec.kind, "--config", str(spec_path), "--log-file", str(log_file)]
        context.log.info(f"trainer ({self.mode}{', ' + self.image if self.mode == 'docker' else ''}): "
                         f"{spec.kind} on {spec.base_model}, log {log_file}")
        if self.mode == "subprocess":
            invocation = self._run_subprocess(context, [sys.executable, *args], log_file)
        else:
            invocation = self._run_container(context, ["python", *args], spec, spec_path)
        results = [m for m in invocation.get_custom_messages() if isinstance(m, dict) and "metrics" in m]
        if not results:
            raise dg.Failure(f"{spec.kind} training exited cleanly but sent no result through Pipes; "
                             f"see {log_file}", metadata={"log_tail": _md(_tail(log_file, self.log_tail_lines))})
        return results[-1]

    def _run_subprocess(self, context, command: list[str], log_file: Path):
        client = dg.PipesSubprocessClient(env={**TRAIN_ENV, **self.env})
        try:
            return client.run(context=context, command=command)
        except DagsterPipesExecutionError as e:
            tail = _tail(log_file, self.log_tail_lines)
            raise _failure(f"training process failed ({e}): {' '.join(command)}", tail) from e

    def _run_container(self, context, command: list[str], spec: JobSpec, spec_path: Path):
        self._check_engine_and_image(context)
        reader = _TailingDockerLogsReader(self.log_tail_lines)
        kwargs = {
            "volumes": {**same_path_mounts(spec, spec_path), **_parse_volumes(self.volumes)},
            "user": self.user or f"{os.getuid()}:{os.getgid()}",
            "shm_size": self.shm_size,
            "labels": {"dagster/run_id": context.run_id, "dpo-driver/job": spec.kind},
            **({"device_requests": [gpu_request(self.gpus)]} if self.gpus else {}),
            **({"network": self.network} if self.network else {}),
        }
        try:
            return PipesDockerClient(message_reader=reader).run(
                context=context, image=self.image, command=command, env={**TRAIN_ENV, **self.env},
                container_kwargs=kwargs,
            )
        except DagsterPipesError as e:
            raise _failure(f"training container {self.image} failed ({e})", "\n".join(reader.tail)) from e
        except docker.errors.APIError as e:  # e.g. gpus requested on an engine without the NVIDIA runtime
            raise dg.Failure(f"Docker could not run the training container {self.image}: {e}") from e
        finally:
            reader.remove_container(context)

    def _check_engine_and_image(self, context) -> None:
        """Fail in seconds, with what to do, when there is no engine or no image (never hang)."""
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        try:
            client = docker.from_env(timeout=self.engine_timeout_s)
            client.ping()
        except (docker.errors.DockerException, requests.RequestException, OSError) as e:
            raise dg.Failure(
                f"trainer mode 'docker' needs a Docker engine, and none answered at {where} within "
                f"{self.engine_timeout_s} s ({type(e).__name__}: {e}). Start one (e.g. `bash "
                "scripts/docker_engine.sh`), point DOCKER_HOST at it, or set the trainer to mode 'subprocess'."
            ) from e
        try:
            client.images.get(self.image)
        except docker.errors.ImageNotFound:
            context.log.info(f"trainer: pulling {self.image}")
            try:
                docker.from_env(timeout=1800).images.pull(self.image)
            except docker.errors.APIError as e:
                raise dg.Failure(f"training image {self.image} is not on the Docker engine at {where} and "
                                 f"could not be pulled ({e}); build it: bash docker/build_image.sh train") from e


def same_path_mounts(spec: JobSpec, spec_path: Path) -> dict[str, dict]:
    """Bind mounts (docker-py `volumes`) that show the job's folders at their own paths.

    Written: the spec's folder, the adapter's parent (training writes a temp dir beside it) and the
    checkpoint scratch dir's parent. Read only: the records' folder, the SFT adapter, a base model
    given as a local folder. A folder already visible through a mount above it is not mounted again.
    """
    wanted = {Path(spec_path).parent: "rw", Path(spec.output_dir).parent: "rw"}
    if spec.scratch_dir:
        wanted.setdefault(Path(spec.scratch_dir).parent, "rw")
    inputs = (spec.sft_adapter_dir, spec.init_adapter_dir, spec.base_model)
    readonly = [Path(spec.records).parent] + [Path(p) for p in inputs if p]
    for p in readonly:
        if p.is_absolute() and p.exists():
            wanted.setdefault(p, "ro")
    mounts: dict[str, dict] = {}
    for path in sorted(wanted, key=lambda p: len(p.parts)):
        mode = wanted[path]
        covered = [mounts[str(a)]["mode"] for a in path.parents if str(a) in mounts]
        if covered and (covered[0] == "rw" or mode == "ro"):
            continue
        mounts[str(path)] = {"bind": str(path), "mode": mode}
    return mounts


def gpu_request(gpus: str):
    """A Docker device request for NVIDIA GPUs: "all" or comma-separated device ids."""
    if gpus == "all":
        return docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])
    return docker.types.DeviceRequest(device_ids=[g.strip() for g in gpus.split(",")], capabilities=[["gpu"]])


def _parse_volumes(volumes: list[str]) -> dict[str, dict]:
    out = {}
    for v in volumes:
        host, _, rest = v.partition(":")
        bind, _, mode = rest.partition(":")
        if not host or not bind:
            raise ValueError(f"trainer volume {v!r} is not 'host:container[:ro|rw]'")
        out[host] = {"bind": bind, "mode": mode or "rw"}
    return out


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return f"(no log at {path}: the process died before the entry point started; see the run's stderr)"


def _md(text: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"```\n{text}\n```")


def _failure(what: str, tail: str) -> dg.Failure:
    return dg.Failure(description=f"{what}\n--- last lines of its log ---\n{tail}", metadata={"log_tail": _md(tail)})


class _TailingDockerLogsReader(PipesDockerLogsMessageReader):
    """Dagster's docker-logs Pipes reader, keeping the container and its last non-Pipes lines.

    Also splits a log chunk into lines before parsing: upstream parses a chunk whole, which drops a
    Pipes message that shares a chunk with another line.
    """

    def __init__(self, keep: int):
        super().__init__()
        self.tail: deque[str] = deque(maxlen=keep)
        self.container = None

    def consume_docker_logs(self, container) -> None:
        self.container = container
        for chunk in container.logs(stdout=True, stderr=True, stream=True, follow=True):
            text = chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else str(chunk)
            for line in text.splitlines():
                if '"__dagster_pipes_version"' not in line:
                    self.tail.append(line)
                extract_message_or_forward_to_stdout(self._handler, line)

    def remove_container(self, context) -> None:
        if self.container is None:
            return
        try:
            self.container.remove(force=True)
        except Exception as e:  # cleanup only: the run's outcome is already decided
            context.log.warning(f"trainer: could not remove container {self.container.id[:12]}: {e}")
