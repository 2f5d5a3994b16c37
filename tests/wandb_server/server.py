"""A small W&B server for the test suite, spoken to by the real ``wandb`` client.

Written against **wandb 0.31.0** (``WANDB_VERSION``): the GraphQL operations of its Go
core (``wandb-core``: ``Viewer``, ``ServerInfo``, ``ServerFeaturesQuery``,
``UpsertBucket``, ``RunResumeStatus``, ``CreateRunFiles``), its
file stream (``POST /files/<entity>/<project>/<run>/file_stream``), the upload URLs it
PUTs files to, and the public API's ``Runs`` query with cursor pagination and
MongoDB-style filters (``wandb/apis/public/runs.py``). A wandb that sends anything
else is answered with HTTP 400 naming the operation, and the operation is kept in
``unknown`` so a test can assert that none happened: an upgrade that needs more is
noticed, not silently half-served.

Where the stage-1 incident lives it behaves like the real service:

- users have API keys, a default entity (their personal entity, or a team: accounts
  created after 2024-05-21 have no personal entity at all) and team memberships, some
  view-only; service accounts (team keys) belong to one team and default to it;
- a run created without an entity goes to the key's default entity;
- a key that cannot write to an entity or a restricted project is refused with the
  service's own 403 body (``permission denied``, code ``PERMISSION_ERROR``); a key that
  cannot read one sees its project as ``null``, exactly like a project that does not
  exist (the service does not tell the two apart);
- a deleted run's id cannot be reused (HTTP 409, the service's message);
- failures on demand (``inject``): 429 with ``Retry-After``, 5xx, or a slow answer, for
  chosen operations (GraphQL operation names, ``file_stream``, ``upload``);
- run states as the service keeps them: a resumed run is ``running`` again, a killed run
  stays ``running`` until its heartbeat times out and then is ``crashed``
  (``kill_run``), and the runs listing may lag behind a finish (``listing_lag``);
- the file stream's history and events are append-only: a chunk at an offset already
  written (two writers of one run id) is kept out and flagged in ``repeated_offsets``;
  ``output.log`` lines are replaced at their offset, as the console capture re-sends a
  line it changed;
- every run keeps entity, project, id, display name, group, state, history, summary,
  exit code and uploaded files for the tests to inspect.

Nothing inside wandb is replaced: the client reaches this server through
``WANDB_BASE_URL`` / ``settings.base_url`` (``logger.base_url`` in tmgg).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from .filters import UnsupportedFilter, matches

WANDB_VERSION = "0.31.0"
PAGE_SIZE = 50  # wandb.Api().runs' default per_page; pagination is the client's


@dataclass
class User:
    """A W&B user (or a team's service account): the key's owner, its default entity,
    its teams, the teams it may only view, and whether it has a personal entity."""

    username: str
    api_key: str
    teams: list[str] = field(default_factory=list)
    default_entity: str = ""
    personal: bool = True
    view_only: list[str] = field(default_factory=list)
    service_account: bool = False

    @property
    def writable(self) -> set[str]:
        own = {self.username} if self.personal else set()
        return (own | {self.default_entity} | set(self.teams)) - set(self.view_only)

    @property
    def readable(self) -> set[str]:
        return self.writable | set(self.view_only)


@dataclass
class Fault:
    """A failure the server answers instead of serving an operation, ``times`` times."""

    operation: str
    status: int = 429
    retry_after: float | None = None
    delay: float = 0.0
    times: int = 1
    served: int = 0
    match: dict[str, Any] = field(default_factory=dict)  # only calls with these variables


@dataclass
class StoredRun:
    """One run as the server keeps it (``name`` is the run id, as in W&B's schema)."""

    entity: str
    project: str
    name: str
    display_name: str = ""
    group: str = ""
    state: str = "running"
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    job_type: str | None = None
    notes: str | None = None
    exit_code: int | None = None
    username: str = ""
    host: str | None = None
    sequence: int = 0
    files: dict[str, bytes] = field(default_factory=dict)
    # (time, state) of every state change, for a listing that lags behind.
    state_log: list[tuple[float, str]] = field(default_factory=list)
    crash_at: float | None = None  # a killed run: when its heartbeat times out

    def set_state(self, state: str) -> None:
        self.state = state
        self.state_log.append((time.monotonic(), state))

    def state_at(self, moment: float) -> str:
        """The state as the service shows it at ``moment`` (a killed run's crash too)."""
        if self.crash_at is not None and moment >= self.crash_at:
            return "crashed"
        earlier = [state for when, state in self.state_log if when <= moment]
        return earlier[-1] if earlier else (self.state_log[0][1] if self.state_log
                                            else self.state)

    @property
    def path(self) -> str:
        return f"{self.entity}/{self.project}/{self.name}"

    @property
    def storage_id(self) -> str:
        return base64.b64encode(f"Run:v1:{self.name}:{self.project}:{self.entity}".encode()
                                ).decode()

    @property
    def history_rows(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.history if line]

    @property
    def created_at(self) -> str:
        return f"2026-01-01T00:{self.sequence // 60 % 60:02d}:{self.sequence % 60:02d}"

    def wandb_config(self) -> dict[str, Any]:
        """``wandbConfig(keys: ["t"])``: present once the client has started the run."""
        internal = (self.config.get("_wandb") or {}).get("value") or {}
        return {"t": internal["t"]} if "t" in internal else {}


class GraphQLError(Exception):
    """An error answered with an HTTP status and W&B's GraphQL error body."""

    def __init__(self, status: int, message: str, path: str | None = None,
                 code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.path = path
        self.code = code
        self.retry_after = retry_after


def permission_denied(path: str | None = None) -> GraphQLError:
    """The service's own refusal: HTTP 403, ``permission denied``, ``PERMISSION_ERROR``."""
    return GraphQLError(403, "permission denied", path, code="PERMISSION_ERROR")


def api_key_for(username: str) -> str:
    """A deterministic 40-character key, the length of a real W&B API key."""
    return hashlib.sha1(f"fake-wandb:{username}".encode()).hexdigest()


class FakeWandbServer:
    """The server's state and its HTTP front end (``start``/``stop``, ``base_url``)."""

    def __init__(self) -> None:
        self.users: dict[str, User] = {}
        self.teams: set[str] = set()
        self.runs: dict[tuple[str, str, str], StoredRun] = {}
        self.deleted: set[tuple[str, str, str]] = set()
        self.unknown: list[str] = []  # operations or paths this fake does not speak
        self.operations: list[str] = []  # every GraphQL operation answered, in order
        self.refused: list[str] = []  # errors answered to the client, for diagnostics
        self.telemetry = 0  # the SDK's own OpenTelemetry posts, accepted and dropped
        self.faults: list[Fault] = []
        self.restricted: dict[tuple[str, str], set[str]] = {}  # project -> member names
        self.listing_lag = 0.0  # seconds the runs listing lags behind state changes
        self.repeated_offsets: list[str] = []  # "<run path> <file> @<offset>"
        self._sequence = itertools.count(1)
        self._projects: dict[tuple[str, str], int] = {}
        self._lock = threading.RLock()
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- set-up and inspection (test side) -------------------------------------------
    def add_user(self, username: str, teams: tuple[str, ...] | list[str] = (),
                 default_entity: str | None = None, personal: bool = True,
                 view_only: tuple[str, ...] | list[str] = ()) -> User:
        """A user; ``personal=False``: no personal entity (default entity a team);
        ``view_only``: teams it is a viewer of (it can read, not write, there)."""
        if not personal and not default_entity:
            raise ValueError(f"user {username} without a personal entity needs a team as "
                             "default entity")
        user = User(username, api_key_for(username), [*teams, *view_only],
                    default_entity or username, personal=personal,
                    view_only=list(view_only))
        with self._lock:
            self.users[user.api_key] = user
            self.teams.update(user.teams)
        return user

    def add_service_account(self, name: str, team: str) -> User:
        """A team's service account: its key writes to the team, its default entity."""
        user = self.add_user(name, teams=[team], default_entity=team, personal=False)
        user.service_account = True
        return user

    def restrict(self, entity: str, project: str, members: tuple[str, ...] | list[str]
                 ) -> None:
        """A restricted project: only ``members`` (usernames) may read or write it."""
        with self._lock:
            self.restricted[(entity, project)] = set(members)

    def inject(self, operation: str, status: int = 429, retry_after: float | None = None,
               delay: float = 0.0, times: int = 1, match: dict[str, Any] | None = None
               ) -> Fault:
        """Answer the next ``times`` calls of ``operation`` (a GraphQL operation name,
        ``file_stream`` or ``upload``) with ``status`` (0: serve it, only ``delay``ed);
        ``match``: only calls whose GraphQL variables (or ``entity``/``project``/``run``
        of a file stream or upload) have these values."""
        fault = Fault(operation, status, retry_after, delay, times, match=dict(match or {}))
        with self._lock:
            self.faults.append(fault)
        return fault

    def kill_run(self, entity: str, project: str, name: str, crash_after: float = 0.0
                 ) -> None:
        """A run whose process died: ``running`` until its heartbeat times out."""
        with self._lock:
            run = self.runs[(entity, project, name)]
            run.set_state("running")
            run.crash_at = time.monotonic() + crash_after

    def plant_run(self, entity: str, project: str, name: str, display_name: str = "",
                  group: str = "", state: str = "finished", exit_code: int | None = 0,
                  username: str = "") -> StoredRun:
        """A run as if a client had logged it (for reconcile's evidence)."""
        with self._lock:
            run = StoredRun(entity, project, name, display_name=display_name, group=group,
                            state=state, exit_code=exit_code, username=username,
                            sequence=next(self._sequence))
            run.state_log.append((float("-inf"), state))
            self.runs[(entity, project, name)] = run
            return run

    def delete_run(self, entity: str, project: str, name: str) -> None:
        """Delete a run as the UI does: it disappears and its id is blocked."""
        with self._lock:
            self.runs.pop((entity, project, name), None)
            self.deleted.add((entity, project, name))

    def runs_in(self, entity: str | None = None, project: str | None = None
                ) -> list[StoredRun]:
        with self._lock:
            return sorted((run for run in self.runs.values()
                           if entity in (None, run.entity) and project in (None, run.project)),
                          key=lambda run: run.sequence)

    def run(self, entity: str, project: str, name: str) -> StoredRun | None:
        return self.runs.get((entity, project, name))

    def assert_understood(self) -> None:
        """Fail when the client sent anything this fake does not implement."""
        assert not self.unknown, f"the fake W&B server was asked for {self.unknown}"

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self._http is not None, "the fake W&B server is not started"
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeWandbServer:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._http = _QuietServer(("127.0.0.1", 0), handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True,
                                        name="fake-wandb-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    # -- protocol (server side) -----------------------------------------------------------
    def user_for(self, authorization: str | None) -> User | None:
        if not authorization:
            return None
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() == "basic":
            try:
                _, _, key = base64.b64decode(credential).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
        elif scheme.lower() == "bearer":
            key = credential
        else:
            return None
        return self.users.get(key.strip())

    def graphql(self, user: User | None, operation: str, variables: dict[str, Any]
                ) -> dict[str, Any]:
        handler = getattr(self, f"_op_{operation}", None)
        if handler is None:
            self.unknown.append(f"GraphQL {operation}")
            raise GraphQLError(400, f"fake W&B server {WANDB_VERSION}: unknown GraphQL "
                                    f"operation {operation!r}")
        if user is None:
            raise GraphQLError(401, "user is not logged in")
        self.operations.append(operation)
        with self._lock:
            return handler(user, variables)

    def _entity_exists(self, entity: str) -> bool:
        return entity in self.teams or any(
            entity == u.default_entity or (u.personal and entity == u.username)
            for u in self.users.values())

    def _readable(self, user: User, entity: str, project: str | None = None) -> bool:
        members = self.restricted.get((entity, project or ""))
        if members is not None and user.username not in members:
            return False
        return entity in user.readable

    def _may_write(self, user: User, entity: str, project: str) -> bool:
        members = self.restricted.get((entity, project))
        if members is not None and user.username not in members:
            return False
        return entity in user.writable

    def fault_for(self, operation: str, variables: dict[str, Any] | None = None
                  ) -> Fault | None:
        """The injected failure for this call of ``operation``, if any (consumed)."""
        variables = variables or {}
        with self._lock:
            for fault in self.faults:
                if any(variables.get(key) != value for key, value in fault.match.items()):
                    continue
                if fault.operation == operation and fault.served < fault.times:
                    fault.served += 1
                    return fault
        return None

    def _op_Viewer(self, user: User, variables: dict[str, Any]) -> dict[str, Any]:
        teams = {"edges": [{"node": {"id": _gid("Entity", t), "name": t}} for t in user.teams]}
        return {"viewer": {
            "id": _gid("User", user.username), "entity": user.default_entity,
            "username": user.username, "name": user.username,
            "email": f"{user.username}@example.test", "flags": "{}", "admin": False,
            "teams": teams, "photoUrl": None, "apiKeys": {"edges": []},
            "defaultFramework": None, "userInfo": None, "deletedAt": None,
        }}

    # The public API's names for the same query (wandb/apis/_generated/operations.py).
    _op_GetViewer = _op_Viewer
    _op_GetDefaultEntity = _op_Viewer

    def _op_ServerInfo(self, user: User, variables: dict[str, Any]) -> dict[str, Any]:
        return {"serverInfo": {"cliVersionInfo": {}, "latestLocalVersionInfo": None,
                               "features": []}}

    def _op_ServerFeaturesQuery(self, user: User, variables: dict[str, Any]
                                ) -> dict[str, Any]:
        return {"serverInfo": {"features": []}}

    def _op_OrganizationCoreWeaveOrganizationID(self, user: User, variables: dict[str, Any]
                                                ) -> dict[str, Any]:
        return {"entity": {"organization": None}}

    def _op_RunResumeStatus(self, user: User, variables: dict[str, Any]) -> dict[str, Any]:
        entity = variables.get("entity") or user.default_entity
        project = variables.get("project") or "uncategorized"
        if not self._readable(user, entity, project):
            return {"model": None}
        run = self.runs.get((entity, project, variables["name"]))
        bucket = None
        if run is not None:
            bucket = {
                "id": run.storage_id, "name": run.name,
                "summaryMetrics": json.dumps(run.summary), "displayName": run.display_name,
                "logLineCount": len(run.logs), "historyLineCount": len(run.history),
                "eventsLineCount": len(run.events),
                "historyTail": json.dumps(run.history[-1:]),
                "eventsTail": json.dumps(run.events[-1:]), "config": json.dumps(run.config),
                "tags": run.tags, "notes": run.notes,
                "wandbConfig": json.dumps(run.wandb_config()),
            }
        return {"model": {"id": _gid("Project", f"{entity}/{project}"), "name": project,
                          "entity": {"id": _gid("Entity", entity), "name": entity},
                          "bucket": bucket}}

    def _op_UpsertBucket(self, user: User, variables: dict[str, Any]) -> dict[str, Any]:
        run = self._run_by_storage_id(variables.get("id"))
        inserted = False
        if run is None:
            entity = variables.get("entity") or user.default_entity
            project = variables.get("project") or "uncategorized"
            name = variables.get("name") or hashlib.sha1(
                str(next(self._sequence)).encode()).hexdigest()[:8]
            if not self._entity_exists(entity):
                raise GraphQLError(404, f"entity {entity} not found", "upsertBucket")
            if not self._may_write(user, entity, project):
                raise permission_denied("upsertBucket")
            key = (entity, project, name)
            if key in self.deleted:
                raise GraphQLError(409, f"run {name} was previously created and deleted; "
                                        "try a new run name", "upsertBucket")
            run = self.runs.get(key)
            if run is None:
                run = StoredRun(entity, project, name, username=user.username,
                                sequence=next(self._sequence))
                run.set_state("running")
                self.runs[key] = run
                inserted = True
            elif run.state != "running":  # the service: a resumed run runs again
                run.set_state("running")
                run.crash_at = None
        elif not self._may_write(user, run.entity, run.project):
            raise permission_denied("upsertBucket")
        self._update_run(run, variables)
        return {"upsertBucket": {"inserted": inserted, "bucket": {
            "id": run.storage_id, "name": run.name, "displayName": run.display_name,
            "description": None, "config": json.dumps(run.config), "sweepName": None,
            "historyLineCount": len(run.history),
            "project": {"id": _gid("Project", f"{run.entity}/{run.project}"),
                        "name": run.project,
                        "entity": {"id": _gid("Entity", run.entity), "name": run.entity}},
        }}}

    def _run_by_storage_id(self, storage_id: str | None) -> StoredRun | None:
        if not storage_id:
            return None
        return next((run for run in self.runs.values() if run.storage_id == storage_id), None)

    @staticmethod
    def _update_run(run: StoredRun, variables: dict[str, Any]) -> None:
        if variables.get("displayName") is not None:
            run.display_name = variables["displayName"]
        if variables.get("groupName") is not None:
            run.group = variables["groupName"]
        if variables.get("config") is not None:
            run.config = json.loads(variables["config"])
        if variables.get("summaryMetrics") is not None:
            run.summary = json.loads(variables["summaryMetrics"])
        for key, attribute in (("tags", "tags"), ("jobType", "job_type"), ("notes", "notes"),
                               ("host", "host")):
            if variables.get(key) is not None:
                setattr(run, attribute, variables[key])
        if variables.get("state") is not None:
            run.set_state(variables["state"])

    def _op_CreateRunFiles(self, user: User, variables: dict[str, Any]) -> dict[str, Any]:
        run = self._writable_run(user, variables["entity"], variables["project"],
                                 variables["run"])
        files = [{"name": name, "uploadUrl": f"{self.base_url}/upload/{run.path}/{name}"}
                 for name in variables["files"]]
        return {"createRunFiles": {"runID": run.storage_id, "uploadHeaders": [],
                                   "files": files}}

    def _writable_run(self, user: User, entity: str, project: str, name: str) -> StoredRun:
        if not self._may_write(user, entity, project):
            raise permission_denied()
        run = self.runs.get((entity, project, name))
        if run is None:
            raise GraphQLError(404, f"run {entity}/{project}/{name} not found")
        return run

    def _op_Runs(self, user: User, variables: dict[str, Any]) -> dict[str, Any]:
        entity, project = variables["entity"], variables["project"]
        runs = [run for run in self.runs.values()
                if (run.entity, run.project) == (entity, project)]
        if not self._readable(user, entity, project) or not runs:
            return {"project": None}  # the client raises "Could not find project"
        seen_at = time.monotonic() - self.listing_lag
        filters = json.loads(variables.get("filters") or "{}")
        try:
            selected = [run for run in runs if matches(run, filters)]
        except UnsupportedFilter as error:
            self.unknown.append(f"filter {error}")
            raise GraphQLError(400, f"fake W&B server {WANDB_VERSION}: {error}") from error
        order = variables.get("order") or "+created_at"
        if order.lstrip("+-") != "created_at":
            self.unknown.append(f"order {order}")
            raise GraphQLError(400, f"fake W&B server: unsupported order {order!r}")
        selected.sort(key=lambda run: run.sequence, reverse=order.startswith("-"))
        start = int(variables["cursor"]) if variables.get("cursor") else 0
        first = int(variables.get("perPage") or PAGE_SIZE)
        page = selected[start:start + first]
        edges = [{"node": self._run_node(run, seen_at), "cursor": str(start + offset + 1)}
                 for offset, run in enumerate(page)]
        return {"project": {
            "internalId": self._project_number(entity, project),
            "runCount": len(selected), "readOnly": False,
            "runs": {"edges": edges, "pageInfo": {
                "endCursor": edges[-1]["cursor"] if edges else None,
                "hasNextPage": start + first < len(selected)}},
        }}

    def _op_Run(self, user: User, variables: dict[str, Any]) -> dict[str, Any]:
        """``wandb.Api().run(path)``: one run, ``null`` when absent or not readable."""
        entity, project = variables["entity"], variables["project"]
        run = self.runs.get((entity, project, variables["name"]))
        if not self._readable(user, entity, project) or run is None:
            return {"project": None}
        return {"project": {"run": self._run_node(run, time.monotonic() - self.listing_lag)}}

    def _op_IsProjectReadOnly(self, user: User, variables: dict[str, Any]
                              ) -> dict[str, Any]:
        """Read-only for a view-only member or a restricted project's non-member;
        ``null`` for a project that is not there or not visible."""
        entity, project = variables["entity"], variables["project"]
        exists = (entity, project) in self.restricted or any(
            (run.entity, run.project) == (entity, project) for run in self.runs.values())
        if not exists or not self._readable(user, entity, project):
            return {"project": None}
        return {"project": {"readOnly": not self._may_write(user, entity, project)}}

    def _op_DeleteRun(self, user: User, variables: dict[str, Any]) -> dict[str, Any]:
        """``Run.delete()``: gone from listings, and its id can never be used again."""
        run = self._run_by_storage_id(variables.get("id"))
        if run is None:
            raise GraphQLError(404, "run not found", "deleteRun")
        if not self._may_write(user, run.entity, run.project):
            raise permission_denied("deleteRun")
        self.delete_run(run.entity, run.project, run.name)
        return {"deleteRun": {"clientMutationId": None}}

    def _project_number(self, entity: str, project: str) -> int:
        """The project's internal id: an integer, as the public API parses it."""
        return self._projects.setdefault((entity, project), len(self._projects) + 1)

    def _run_node(self, run: StoredRun, seen_at: float) -> dict[str, Any]:
        return {
            "id": run.storage_id, "projectId": self._project_number(run.entity, run.project),
            "name": run.name, "displayName": run.display_name, "tags": run.tags,
            "sweepName": None, "state": run.state_at(seen_at),
            "config": json.dumps(run.config),
            "group": run.group or None, "jobType": run.job_type, "commit": None,
            "readOnly": False, "createdAt": run.created_at, "heartbeatAt": run.created_at,
            "description": None, "notes": run.notes, "systemMetrics": "{}",
            "summaryMetrics": json.dumps(run.summary), "historyLineCount": len(run.history),
            "user": {"name": run.username, "username": run.username},
            "historyKeys": None,
        }

    def file_stream(self, user: User | None, entity: str, project: str, name: str,
                    body: dict[str, Any]) -> dict[str, Any]:
        if user is None:
            raise GraphQLError(401, "user is not logged in")
        with self._lock:
            run = self._writable_run(user, entity, project, name)
            for file_name, chunk in (body.get("files") or {}).items():
                offset, content = int(chunk.get("offset", 0)), list(chunk.get("content", []))
                lines = {"wandb-history.jsonl": run.history, "wandb-events.jsonl": run.events,
                         "output.log": run.logs}.get(file_name)
                if lines is not None:
                    self._append(run, file_name, lines, offset, content)
                elif file_name == "wandb-summary.json" and content:
                    run.summary = json.loads(content[-1])
            if body.get("complete"):
                run.exit_code = int(body.get("exitcode") or 0)
                run.set_state("finished" if run.exit_code == 0 else "failed")
                run.crash_at = None
            elif run.state != "running":
                run.set_state("running")
        return {"exitcode": None, "limits": {}}

    def _append(self, run: StoredRun, file_name: str, lines: list[str], offset: int,
                content: list[str]) -> None:
        """Append-only: lines at an offset already written are flagged, not stored.

        Except ``output.log``: wandb's console capture re-sends a line it changed (a
        carriage return, a progress bar) at that line's offset, and the service replaces
        it; only the run's history and events are append-only streams."""
        if file_name == "output.log" and offset < len(lines):
            lines[offset:offset + len(content)] = content
            return
        if offset < len(lines):
            self.repeated_offsets.append(f"{run.path} {file_name} @{offset}")
            content = content[len(lines) - offset:]
            offset = len(lines)
        if offset > len(lines):  # a gap: what the service would see as lost lines
            lines.extend([""] * (offset - len(lines)))
        lines.extend(content)

    def upload(self, path: str, data: bytes) -> None:
        entity, project, name, file_name = path.split("/", 3)
        with self._lock:
            run = self.runs.get((entity, project, name))
            if run is None:
                raise GraphQLError(404, f"run {entity}/{project}/{name} not found")
            run.files[file_name] = data


def _gid(kind: str, key: str) -> str:
    return base64.b64encode(f"{kind}:{key}".encode()).decode()


def operation_name(body: dict[str, Any]) -> str:
    """The operation's name: ``operationName``, else the first named query/mutation."""
    if body.get("operationName"):
        return str(body["operationName"])
    match = re.search(r"\b(?:query|mutation)\s+(\w+)", str(body.get("query", "")))
    return match.group(1) if match else "<anonymous>"


class _QuietServer(ThreadingHTTPServer):
    """Clients that drop a keep-alive connection at exit are not an error."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeWandbServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _body(self) -> bytes:
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            data = gzip.decompress(data)
        return data

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, error: GraphQLError, data_key: str | None = None) -> None:
        self.fake.refused.append(f"{error.status}: {error}")
        message: dict[str, Any] = {"message": str(error)}
        if error.path:
            message["path"] = [error.path]
        if error.code:
            message["extensions"] = {"code": error.code}
        payload: dict[str, Any] = {"errors": [message]}
        if error.path:
            payload["data"] = {error.path: None}
        data = json.dumps(payload).encode()
        self.send_response(error.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error.retry_after is not None:
            self.send_header("Retry-After", f"{error.retry_after:g}")
        self.end_headers()
        self.wfile.write(data)

    def _injected(self, operation: str, variables: dict[str, Any] | None = None) -> bool:
        """Answer an injected failure (True), or sleep an injected delay and serve."""
        fault = self.fake.fault_for(operation, variables)
        if fault is None:
            return False
        if fault.delay:
            time.sleep(fault.delay)
        if not fault.status:
            return False
        reason = {429: "rate limit exceeded"}.get(fault.status, "internal server error")
        self._error(GraphQLError(fault.status, f"{reason} (injected)",
                                 retry_after=fault.retry_after))
        return True

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        user = self.fake.user_for(self.headers.get("Authorization"))
        path = self.path.split("?", 1)[0]
        body = self._body()
        try:
            if path == "/graphql":
                request = json.loads(body or b"{}")
                operation = operation_name(request)
                if self._injected(operation, request.get("variables") or {}):
                    return
                self._reply(200, {"data": self.fake.graphql(
                    user, operation, request.get("variables") or {})})
                return
            stream = re.fullmatch(r"/files/([^/]+)/([^/]+)/([^/]+)/file_stream", path)
            if stream:
                entity, project, name = (unquote(part) for part in stream.groups())
                if self._injected("file_stream", {"entity": entity, "project": project,
                                                  "run": name}):
                    return
                self._reply(200, self.fake.file_stream(user, entity, project, name,
                                                       json.loads(body or b"{}")))
                return
            if path.startswith("/sdk/otel/"):  # wandb's telemetry about itself
                self.fake.telemetry += 1
                self._reply(200, {})
                return
        except GraphQLError as error:
            self._error(error)
            return
        self._unknown("POST")

    def do_PUT(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        data = self._body()
        if path.startswith("/upload/"):
            if self._injected("upload"):
                return
            try:
                self.fake.upload(unquote(path.removeprefix("/upload/")), data)
            except GraphQLError as error:
                self._error(error)
                return
            self._reply(200, {})
            return
        self._unknown("PUT")

    def do_GET(self) -> None:  # noqa: N802
        self._unknown("GET")

    def _unknown(self, method: str) -> None:
        self.fake.unknown.append(f"{method} {self.path}")
        self._reply(400, {"errors": [{"message": f"fake W&B server {WANDB_VERSION}: "
                                                 f"unknown endpoint {method} {self.path}"}]})
