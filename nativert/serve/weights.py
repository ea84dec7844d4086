"""Fleet-wide weight swaps: a two-phase commit over every replica's Executor.

A small async Ray actor (one per application) coordinates. Each replica registers when it has
loaded the package, then long-polls the coordinator for commands from a thread of its own.
An update broadcasts `stage` (each replica's `Executor.stage_weights`: validate names, shapes
and dtypes, then every delegate's `process_weights`); only if every live replica staged does
it broadcast `commit`, otherwise `discard`. Replicas switch with one assignment each, so a
response is computed entirely on one version (it reports which); between the first and the
last replica's commit (milliseconds) both versions answer. The committed weights stay in the
object store, so a replica that starts later (a restart) loads them before it serves.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

STAGE_TIMEOUT_S = 120.0
POLL_S = 2.0
# A replica that has not polled for this long is gone (killed, restarted under a new id).
STALE_S = 15.0


def coordinator_name(app: str) -> str:
    return f"nativert-weights-{app}"


@ray.remote(num_cpus=0)
class WeightCoordinator:
    def __init__(self) -> None:
        self.seen: dict[str, float] = {}
        self.versions: dict[str, int] = {}
        self.version = 0
        self.committed: list | None = None  # [ObjectRef of the committed state_dict]
        self.seq = 0
        self.command: tuple | None = None
        self.acks: dict[str, tuple[bool, str]] = {}
        self.changed = asyncio.Condition()
        self.updating = asyncio.Lock()

    async def register(self, replica: str) -> tuple[int, int, list | None]:
        """(command seq to follow from, committed version, [its weights] or None)."""
        async with self.updating:  # not in the middle of an update: take the outcome
            self.seen[replica] = time.monotonic()
            self.versions[replica] = self.version
            return self.seq, self.version, self.committed

    async def next_command(self, replica: str, after: int) -> tuple | None:
        self.seen[replica] = time.monotonic()
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: self.seq > after), timeout=POLL_S
                )
            except asyncio.TimeoutError:
                return None
            return self.command

    async def ack(self, replica: str, seq: int, ok: bool, error: str) -> None:
        async with self.changed:
            if seq == self.seq:
                self.acks[replica] = (ok, error)
                self.changed.notify_all()

    async def _broadcast(self, kind: str, payload: Any, members: list[str]) -> dict:
        async with self.changed:
            self.seq += 1
            self.command = (self.seq, kind, payload)
            self.acks = {}
            self.changed.notify_all()
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: all(m in self.acks for m in members)),
                    timeout=STAGE_TIMEOUT_S,
                )
            except asyncio.TimeoutError:
                pass
            return {
                m: self.acks.get(m, (False, f"no answer within {STAGE_TIMEOUT_S:.0f} s"))
                for m in members
            }

    async def update(self, state_dict: dict, strict: bool = True) -> dict:
        """Stage on every live replica, then commit on all, or discard on all."""
        async with self.updating:
            now = time.monotonic()
            members = sorted(r for r, t in self.seen.items() if now - t < STALE_S)
            if not members:
                return {"ok": False, "status": 503, "error": "no live replica to update"}
            ref = ray.put(state_dict)
            version = self.version + 1
            staged = await self._broadcast("stage", ([ref], strict, version), members)
            failed = {m: err for m, (ok, err) in staged.items() if not ok}
            if failed:
                await self._broadcast("discard", None, members)
                replica, error = next(iter(failed.items()))
                client_error = all(e.startswith("WeightsError") for e in failed.values())
                return {
                    "ok": False,
                    "status": 400 if client_error else 500,
                    "error": f"replica {replica}: {error}; nothing was committed "
                    f"(all {len(members)} replicas stay on version {self.version})",
                }
            committed = await self._broadcast("commit", version, members)
            self.version, self.committed = version, [ref]
            for m, (ok, _) in committed.items():
                if ok:
                    self.versions[m] = version
            lost = {m: err for m, (ok, err) in committed.items() if not ok}
            if lost:  # staged but could not switch: a replica died in between
                return {
                    "ok": False,
                    "status": 500,
                    "version": version,
                    "error": f"commit failed on {lost}",
                }
            return {"ok": True, "version": version, "replicas": members}

    async def status(self) -> dict:
        now = time.monotonic()
        live = {r: self.versions.get(r) for r, t in self.seen.items() if now - t < STALE_S}
        return {"version": self.version, "replicas": live}


def follow(coordinator, replica: str, after: int, executor, stop) -> None:
    """A replica's command loop (its own thread): stage, commit or discard as told."""
    while not stop.is_set():
        try:
            command = ray.get(coordinator.next_command.remote(replica, after))
        except (ray.exceptions.RayActorError, ray.exceptions.RaySystemError):
            return  # the application is going away
        if command is None:
            continue
        seq, kind, payload = command
        after = seq
        try:
            if kind == "stage":
                (ref,), strict, version = payload
                executor.stage_weights(ray.get(ref), strict=strict, version=version)
            elif kind == "commit":
                executor.commit_weights()
            else:
                executor.discard_weights()
            ok, error = True, ""
        except Exception as exc:  # reported to the coordinator, which aborts the update
            ok, error = False, f"{type(exc).__name__}: {exc}"
        coordinator.ack.remote(replica, seq, ok, error)
