"""The Modal App that runs tmgg jobs: image, W&B secret, outputs volume, job function.

``run_job`` is the body of the remote function. It runs a job's payload through
``tmgg.run.executor.execute_payload`` — the function the local launcher's
workers run — reloading the volume first and committing it once per validation round
(after that round's checkpoints) and at the end (``VolumeSync``), so a retried or
preempted job finds its last checkpoint on the volume and resumes from it (its output
directory is derived from the job id, its W&B run id too).

``build_app`` attaches ``run_job`` to a ``modal.App`` configured per sweep (app,
volume and secret names come from ``hydra.launcher``). ``run_job`` stays a module
global, which is how a Modal container finds it when it imports this module.
Per-sweep resources (GPU, CPU, memory, timeout, retries, max_containers) are applied
with ``Function.with_options`` by the dispatcher.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import modal

log = logging.getLogger(__name__)

# Checked against modal 1.6.4 (Image.uv_pip_install, add_local_dir, Volume.commit,
# Function.local); tests/test_lock.py fails when the lock moves modal off it.
MODAL_CHECKED_VERSION = "1.6.4"
# Where the outputs volume is mounted in every container.
VOLUME_MOUNT = "/vol"
# Packages whose pickles cross the wire (payloads out, results back).
PICKLE_CRITICAL = ("hydra-core", "omegaconf", "cloudpickle")
# Where the image puts tmgg's packages (on the containers' PYTHONPATH) and conf/.
CONTAINER_ROOT = "/root"
CONTAINER_CONF_DIR = "/conf"
# train.py reads this variable to add a launcher's Lightning callbacks (a
# "module:function" factory called with (cfg, output_dir)).
CALLBACK_FACTORY_ENV = "TMGG_CALLBACK_FACTORY"
# transport=local: where the stand-in volume logs its commits and reloads (JSON lines).
LOCAL_COMMIT_LOG_ENV = "TMGG_LOCAL_VOLUME_COMMIT_LOG"
FUNCTION_NAME = "run_job"
KEY_CHECK_FUNCTION_NAME = "wandb_key_identity"
# transport=local: the stand-in for the Modal Secret's WANDB_API_KEY (a container of
# the local transport, and its key check, use this key, not the launching shell's).
LOCAL_WANDB_SECRET_ENV = "TMGG_LOCAL_WANDB_SECRET_KEY"

# transport=local: where the stand-in volume is (its commits check for open files),
# and the container-local disk its containers keep their scratch folders on.
LOCAL_VOLUME_DIR_ENV = "TMGG_LOCAL_VOLUME_DIR"
LOCAL_SCRATCH_ENV = "TMGG_LOCAL_SCRATCH_DIR"
# Where a job's files that stay open while it runs go instead of the volume (W&B's):
# the container's own disk, lost with the container as on Modal.
SCRATCH_DIR = "/tmp/tmgg-volume-scratch"


class VolumeSync:
    """Commit and reload of the outputs volume from inside a container, never fatal.

    modal 1.6.4: ``commit()`` persists the container's changes and then reloads, and
    ``reload()`` makes commits of other containers visible here (a warm container sees
    the volume as it was when mounted); both raise ``RuntimeError`` while files on the
    volume are open (``tmgg.launch.modal.volume_files``), and commit raises on a conflict.
    So log files are closed first, and a failure is logged, not raised: a checkpoint
    commit that failed is tried again at the next checkpoint and at the job's end, and
    a failed final commit cannot make Modal retry a finished job (Modal also commits a
    container's volumes when the container exits).

    transport=local: the volume is a directory (``local_volume_dir``, or none) that each
    container works on through its own view (``tmgg.launch.snapshot_volume``: taken at
    reload, written back at commit) where the machine allows, else in place; a commit
    or reload fails, as on Modal, while files under it are open in the container, and
    every operation is logged (JSON lines) when a log path is set.
    """

    def __init__(self, volume_name: str | None) -> None:
        self.name = volume_name
        on_modal = bool(volume_name) and not modal.is_local()
        self.volume = modal.Volume.from_name(volume_name) if on_modal else None
        local_dir = os.environ.get(LOCAL_VOLUME_DIR_ENV)
        self.root: Path | None = Path(VOLUME_MOUNT) if on_modal else (
            Path(local_dir) if local_dir else None)
        self.uncommitted: str | None = None  # why the last failed commit was made

    def commit(self, reason: str) -> bool:
        ok = self._run("commit", reason)
        self.uncommitted = None if ok else reason
        return ok

    def reload(self, reason: str) -> bool:
        return self._run("reload", reason)

    def _run(self, operation: str, reason: str) -> bool:
        from tmgg.launch.modal.volume_files import close_log_files_under, open_files_under

        started = time.perf_counter()
        error: str | None = None
        try:
            if self.root is not None:
                close_log_files_under(self.root)
            if self.volume is not None:
                getattr(self.volume, operation)()
            elif self.root is not None:
                from tmgg.launch.snapshot_volume import current

                still_open = open_files_under(self.root)
                if still_open:  # what Modal answers, for the stand-in to be honest
                    raise RuntimeError("there are open files preventing the operation: "
                                       + ", ".join(still_open[:3]))
                view = current()  # this container's own view of the stand-in volume
                if view is not None:
                    getattr(view, operation)()
        except Exception as exc:  # noqa: BLE001 - logged; retried or left to Modal
            error = f"{type(exc).__name__}: {exc}"
            log.warning("volume %s %s (%s) failed: %s", self.name, operation, reason, error)
        else:
            log.info("volume %s %s (%s) in %.1fs", self.name, operation, reason,
                     time.perf_counter() - started)
        self._log(operation, reason, error)
        return error is None

    @staticmethod
    def _log(operation: str, reason: str, error: str | None) -> None:
        path = os.environ.get(LOCAL_COMMIT_LOG_ENV)
        if path:
            from tmgg.launch.snapshot_volume import current

            view = current()  # the log bypasses the container's view of the volume
            log_path = view.real(Path(path)) if view is not None else Path(path)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as handle:
                handle.write(json.dumps({"time": time.time(), "pid": os.getpid(),
                                         "op": operation, "reason": reason,
                                         "error": error}) + "\n")


# The volume of the job running in this process (one job at a time per container).
_VOLUME: dict[str, VolumeSync] = {}


def commit_volume(reason: str) -> None:
    volume = _VOLUME.get("volume")
    if volume is None:
        return
    if volume.uncommitted:
        reason = f"{reason} (and the failed commit at {volume.uncommitted})"
    volume.commit(reason)


def checkpoint_callbacks(cfg: Any, output_dir: Any) -> list[Any]:
    """Lightning callbacks added to a job by train.py (named by TMGG_CALLBACK_FACTORY)."""
    from lightning.pytorch.callbacks import Callback

    class CommitVolumeAfterCheckpoints(Callback):
        """Commit the volume once per validation round, after its checkpoints are written.

        Wraps the save of the trainer's checkpoint IO (what ``trainer.save_checkpoint``
        and ModelCheckpoint end in, and what a fused group's MemberCheckpoints writes
        every member's checkpoints with) to note what was written; the commit comes at
        the next training step, once every checkpoint of the round (every member's, in
        a fused group) is on disk, and at the end of training. A commit per file would
        cost a 36-member group hundreds of commits per container. ``run_job`` commits
        again at the job's end, and a failing job commits on its exception.
        """

        def __init__(self) -> None:
            self.written: list[str] = []  # checkpoint files not committed yet

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            io = trainer.strategy.checkpoint_io
            if getattr(io, "_tmgg_commits_volume", False):
                return
            save = io.save_checkpoint

            def save_and_note(checkpoint: Any, path: Any, *args: Any, **kwargs: Any) -> None:
                save(checkpoint, path, *args, **kwargs)
                self.written.append(str(path))

            io.save_checkpoint = save_and_note
            io._tmgg_commits_volume = True

        def commit_written(self) -> None:
            if self.written:
                count, last = len(self.written), self.written[-1]
                self.written = []
                commit_volume(f"checkpoints ({count} file(s)) {last}")

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            self.commit_written()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.commit_written()

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            self.written = []
            commit_volume(f"exception {type(exception).__name__}")

    return [CommitVolumeAfterCheckpoints()]


def run_job(payload: bytes, volume_name: str | None) -> bytes:
    """The remote function: one job's payload in, its pickled JobReturn out.

    Never raises for a failing job (the executor turns it into a FAILED JobReturn
    carrying the traceback), so Modal's retries apply to lost containers, timeouts
    and preemptions only. Before the job looks for its ``last.ckpt``, the volume is
    reloaded: a retry on a warm container must see what the lost attempt committed.
    """
    from tmgg.launch.modal.volume_files import SCRATCH_ROOT_ENV, VOLUME_ROOT_ENV, copy_back
    from tmgg.run.executor import execute_payload

    _use_local_secret_stand_in()
    volume = VolumeSync(volume_name)
    _VOLUME["volume"] = volume
    os.environ[CALLBACK_FACTORY_ENV] = f"{__name__}:checkpoint_callbacks"
    scratch: Path | None = None
    if volume.root is not None:
        from tmgg.jobs.sweep import LAUNCHER_HOLDS_CLAIMS_ENV

        base = Path(os.environ.get(LOCAL_SCRATCH_ENV) or SCRATCH_DIR)
        scratch = base / f"container-{os.getpid()}"
        os.environ[VOLUME_ROOT_ENV] = str(volume.root)
        os.environ[SCRATCH_ROOT_ENV] = str(scratch)
        # The job's records go to the volume, its claim stays the launcher's.
        os.environ[LAUNCHER_HOLDS_CLAIMS_ENV] = "1"
    volume.reload("job start")
    try:
        return execute_payload(payload)
    finally:
        if scratch is not None and volume.root is not None:
            try:  # the W&B run's files, closed by now; never worth a retry of the job
                copy_back(scratch, volume.root)
            except OSError as error:
                log.warning("could not copy %s onto the volume: %s", scratch, error)
        commit_volume("job end")
        _VOLUME.pop("volume", None)


def _secret_key() -> str | None:
    """The WANDB_API_KEY the Secret gives a container (transport=local: its stand-in)."""
    stand_in = os.environ.get(LOCAL_WANDB_SECRET_ENV)
    if stand_in and modal.is_local():
        return stand_in
    return os.environ.get("WANDB_API_KEY")


def _use_local_secret_stand_in() -> None:
    """transport=local, in a container: the Secret's key replaces the launching shell's,
    as on Modal."""
    key = _secret_key()
    if key:
        os.environ["WANDB_API_KEY"] = key


def wandb_key_identity(base_url: str, entity: str, project: str) -> dict[str, Any]:
    """The workers' W&B key, asked where the workers run (the Secret mounted): whose it
    is, its default entity, the entities it may write to, and whether it may write to
    ``entity/project``.

    A small CPU function on the sweep's image; on Modal it costs one container start
    (seconds) before dispatch. Never raises: a key that cannot be checked says why.
    """
    key = _secret_key()  # this process's environment stays as it is (local calls)
    if not key:
        return {"error": "the workers have no WANDB_API_KEY (the Modal Secret holds none)"}
    try:
        import wandb

        from tmgg.jobs.wandb_check import key_access, write_refusal

        api = wandb.Api(overrides={"base_url": base_url}, api_key=key, timeout=60)
        viewer = api.viewer
        access = key_access(api)
        refusal = write_refusal(api, entity, project, base_url)
    except Exception as error:  # noqa: BLE001 - reported to the launcher, which refuses
        return {"error": f"{type(error).__name__}: {error}"}
    return {"user": access.user, "default_entity": getattr(viewer, "entity", None),
            "writable": sorted(access.writable), "can_write": refusal is None,
            "refusal": refusal}


@dataclass
class ModalApp:
    app: Any  # modal.App
    function: Any  # modal.Function running run_job
    volume: Any  # modal.Volume
    key_check: Any = None  # modal.Function running wandb_key_identity (Secret mounted)


@dataclass(frozen=True)
class ImageSources:
    """What a container image is built from, found through the installed packages.

    Nothing here assumes a checkout: the lock is package data, tmgg and its Hydra
    plugins are wherever this interpreter imports them from (``src/`` when editable,
    ``site-packages`` when not), conf/ is ``tmgg.config.CONF_DIR``.
    """

    requirements_lock: Path  # every dependency but torch, with hashes
    torch_lock: Path  # torch's version; the container takes PyPI's (CUDA) wheel
    uv_version: str  # the uv that installs the lock on this machine
    packages: dict[str, Path]  # container path under /root -> local package directory
    conf_dir: Path

    @classmethod
    def installed(cls) -> ImageSources:
        from tmgg.config import CONF_DIR
        from tmgg.config.lockfile import REQUIREMENTS_LOCK, TORCH_LOCK, UV_LOCK, locked_version

        packages = {}
        for module in ("tmgg", "hydra_plugins.tmgg_launchers", "hydra_plugins.tmgg_sweepers"):
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                raise RuntimeError(f"cannot build the Modal image: {module} is not importable")
            packages[module.replace(".", "/")] = Path(list(spec.submodule_search_locations)[0])
        if not (CONF_DIR / "train.yaml").is_file():
            raise RuntimeError(
                f"cannot build the Modal image: no conf/ at {CONF_DIR} (set TMGG_CONF_DIR "
                "or run from the checkout)")
        _warn_if_not_locked(REQUIREMENTS_LOCK)
        return cls(requirements_lock=REQUIREMENTS_LOCK, torch_lock=TORCH_LOCK,
                   uv_version=locked_version("uv", UV_LOCK), packages=packages,
                   conf_dir=CONF_DIR)


def _warn_if_not_locked(lock: Path) -> None:
    """Payloads are pickled here and unpickled in a container that has the lock's
    versions: say so when this machine's pickle-critical packages differ from them."""
    from importlib import metadata

    from tmgg.config.lockfile import LockError, locked_version

    for name in PICKLE_CRITICAL:
        try:
            local, locked = metadata.version(name), locked_version(name, lock)
        except (metadata.PackageNotFoundError, LockError):
            continue
        if local != locked:
            log.warning("%s %s is installed here but the Modal image has the lock's %s: "
                        "run `make install` so payloads unpickle alike", name, local, locked)


def build_image(sources: ImageSources | None = None) -> Any:
    """Debian slim with the locked environment and tmgg's source and conf/.

    The same lock as ``make install`` (``--require-hashes``), so a job runs the same
    versions here and on Modal (the pickles crossing the wire included); torch
    from its own pin, taking the index's CUDA build. The Python minor version matches
    this machine's. tmgg and hydra_plugins go to /root, conf/ to /conf, where
    ``tmgg.config.CONF_DIR`` points from there.
    """
    sources = sources or ImageSources.installed()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    ignore = ["**/__pycache__", "**/*.pyc", "**/.*"]
    image = (
        modal.Image.debian_slim(python_version=python)
        .uv_pip_install(requirements=[str(sources.requirements_lock)],
                        extra_options="--require-hashes --no-deps",
                        uv_version=sources.uv_version)
        .uv_pip_install(requirements=[str(sources.torch_lock)], uv_version=sources.uv_version)
        .env({"PYTHONUNBUFFERED": "1"})
    )
    for remote, local in sources.packages.items():
        image = image.add_local_dir(local, f"{CONTAINER_ROOT}/{remote}", ignore=ignore)
    return image.add_local_dir(sources.conf_dir, CONTAINER_CONF_DIR, ignore=ignore)


def build_app(app_name: str, volume_name: str, wandb_secret: str | None,
              timeout_s: int = 3600) -> ModalApp:
    """The App of one sweep; nothing here talks to Modal until ``app.run()``."""
    volume = modal.Volume.from_name(volume_name, create_if_missing=True)
    secrets = [modal.Secret.from_name(wandb_secret)] if wandb_secret else []
    app = modal.App(app_name, image=build_image())
    function = app.function(
        name=FUNCTION_NAME,
        volumes={VOLUME_MOUNT: volume},
        secrets=secrets,
        timeout=int(timeout_s),
        serialized=False,
        # The image adds tmgg and hydra_plugins itself (with conf/ beside them).
        include_source=False,
    )(run_job)
    key_check = app.function(name=KEY_CHECK_FUNCTION_NAME, secrets=secrets, timeout=120,
                             serialized=False, include_source=False)(wandb_key_identity)
    return ModalApp(app=app, function=function, volume=volume, key_check=key_check)


def workers_key_identity(settings: Any, base_url: str, entity: str, project: str
                         ) -> dict[str, Any]:
    """Ask the workers' key who it is, through the launcher's transport: on Modal one
    call of the key-check function (the Secret mounted), locally ``Function.local()``
    with the Secret's stand-in (``TMGG_LOCAL_WANDB_SECRET_KEY``)."""
    built = build_app(settings.app_name, settings.volume, settings.wandb_secret, 120)
    if settings.transport != "modal":
        return built.key_check.local(base_url, entity, project)
    with built.app.run():
        return built.key_check.remote(base_url, entity, project)


def check_workers_wandb_key(settings: Any, jobs: Any) -> list[str]:
    """Before dispatch: the key the containers will use may write to the pinned entity
    (``tmgg.jobs.wandb_check.check_workers_key``). Locally without a Secret
    stand-in the containers use this shell's key, already checked at plan time."""
    from tmgg.jobs.wandb_check import check_workers_key

    if settings.transport == "modal" and settings.wandb_secret:
        where = f"Modal Secret {settings.wandb_secret!r}"
    elif settings.transport != "modal" and os.environ.get(LOCAL_WANDB_SECRET_ENV):
        where = f"the local transport's Secret stand-in {LOCAL_WANDB_SECRET_ENV}"
    else:
        return []
    return check_workers_key(
        jobs, lambda base_url, entity, project: workers_key_identity(
            settings, base_url, entity, project), where)
