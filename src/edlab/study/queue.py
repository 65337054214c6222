"""The study's queue: its Optuna storage, shared by every worker, and the trials they claim from it.

Grid and list points are enqueued once each as WAITING trials; a worker claims one (RUNNING from then on,
exactly one worker per trial, also on SQLite, which has no row locks) and a trial left RUNNING by a process
that died is marked FAIL (interrupted) by ``recover`` and its point enqueued again by ``enqueue_missing``: the
same command finishes a study without repeating finished trials. Several processes share one SQLite file, so
every storage call goes through ``retry`` ('database is locked').
"""

from __future__ import annotations

import math
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import EdlabError
from .schema import Study, directions, full_epochs


def import_optuna():
    """Optuna, quiet, or the one-line error that says how to install it (it is an optional dependency)."""
    try:
        import optuna
    except ImportError:
        raise EdlabError("edlab sweep needs Optuna: pip install 'edlab[study]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def retry(fn, *args, **kwargs):
    """SQLite shared by several processes answers 'database is locked' under contention: wait and retry."""
    delay = 0.1
    for attempt in range(12):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # sqlalchemy OperationalError, or Optuna's StorageInternalError raised from it
            if "database is locked" not in f"{e} {e.__cause__}" or attempt == 11:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def storage_url(st: Study, storage: str | None) -> str:
    """``--storage`` as given, else the SQLite file <out>/study.db (one machine's workers share it)."""
    if storage:
        return storage
    st.out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(st.out / 'study.db').resolve()}"


INIT_RACE = ("already exists", "UNIQUE constraint failed", "duplicate key", "Duplicate entry")


@contextmanager
def _init_lock(url: str):
    """Two sweeps started at the same instant on a new storage both create its tables: the loser failed
    with 'table studies already exists'. On SQLite a lock file beside the database orders them; other
    databases retry (see _open_storage)."""
    try:
        import fcntl

        from sqlalchemy.engine import make_url

        db = make_url(url).database if url.startswith("sqlite") else None
    except Exception:
        db = None
    if not db or db == ":memory:":
        yield
        return
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.init-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _open_storage(optuna, url: str):
    kwargs = {"engine_kwargs": {"connect_args": {"timeout": 60}}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            with _init_lock(url):
                return retry(optuna.storages.RDBStorage, url, **kwargs)
        except Exception as e:
            if attempt < 4 and any(m in f"{e} {e.__cause__}" for m in INIT_RACE):
                time.sleep(0.2 * (attempt + 1))  # another process was creating the tables: they exist now
                continue
            raise EdlabError(f"cannot open study storage {redact(url)}: {str(e).splitlines()[0]}") from None


def open_study(st: Study, url: str, worker: int = 0, create: bool = True):
    """Create or load the Optuna study; refuse one that was started from a different study definition."""
    optuna = import_optuna()
    storage = _open_storage(optuna, url)
    if st.mode == "search":
        sampler = optuna.samplers.TPESampler(seed=st.seed + worker, n_startup_trials=st.startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=st.seed)  # every parameter is fixed by the enqueued point
    pruner = make_pruner(optuna, st)
    if create:
        study = retry(optuna.create_study, storage=storage, study_name=st.name, directions=directions(st),
                       sampler=sampler, pruner=pruner, load_if_exists=True)
    else:
        study = retry(optuna.load_study, storage=storage, study_name=st.name, sampler=sampler, pruner=pruner)
    saved = study.user_attrs.get("edlab_spec")
    if saved is None:
        retry(study.set_user_attr, "edlab_spec", st.fingerprint())
        retry(study.set_user_attr, "study_file", st.file)
    elif saved != st.fingerprint():
        raise EdlabError(f"study '{st.name}' in {redact(url)} was started from a different definition (base, "
                         f"overrides, points or objective changed); choose another --out or --storage")
    if [d.name.lower() for d in study.directions] != directions(st):
        raise EdlabError(f"study '{st.name}' in {redact(url)} has other objectives; choose another --out")
    return study


def make_pruner(optuna, st: Study):
    """The study's Optuna pruner over the epochs of each trial's training stage (NopPruner without one).
    Successive halving keeps the top 1/reduction_factor of the trials that reached each rung (min_epochs x
    reduction_factor^k epochs); Hyperband runs several such brackets of different min_epochs; median stops a
    trial whose accuracy is below the median of the earlier trials' at the same epoch."""
    p = st.pruner
    if p is None:
        return optuna.pruners.NopPruner()
    if p["type"] == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p["min_epochs"],
                                                      reduction_factor=p["reduction_factor"])
    if p["type"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p["min_epochs"], max_resource=max(
            p["min_epochs"], math.ceil(full_epochs(st, {})[0])), reduction_factor=p["reduction_factor"])
    return optuna.pruners.MedianPruner(n_startup_trials=p["startup_trials"], n_warmup_steps=p["min_epochs"] - 1)


def redact(url: str) -> str:
    """A storage URL fit to print and to record in study.json: its password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process from Linux /proc, or None where there is no /proc entry."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _proc_start(pid: int) -> str | None:
    """Start time of a process (Linux /proc), so a reused pid is not taken for the worker that died."""
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid())}


def _alive(owner: dict) -> bool:
    """Whether the owner process still runs. A killed process stays in the process table as a zombie
    until its parent reaps it, and the parent of a sweep's workers is init once the sweep itself was
    killed, which reaps when it gets to it: signal 0 still reaches a zombie, so /proc's state decides."""
    pid = owner.get("pid")
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    stat = _proc_stat(int(pid))
    if stat is None:  # gone meanwhile, or no /proc (not Linux, no start time recorded): signal 0 decides
        return owner.get("pid_start") is None
    state, start = stat
    if state in ("Z", "X", "x"):  # zombie or dead: it will never write to its trial again
        return False
    return owner.get("pid_start") is None or start == owner.get("pid_start")


def _claim_key(owner: dict) -> str:
    return f"claim:{owner['host']}|{owner['pid']}|{owner['pid_start']}"


def _from_claim_key(key: str) -> dict:
    host, pid, start = key[len("claim:"):].rsplit("|", 2)
    return {"host": host, "pid": int(pid), "pid_start": None if start == "None" else start}


def _stale(t, stale_after: float) -> bool:
    """A RUNNING trial is dead when its process is gone (same machine) or its heartbeat is old (elsewhere).

    The process is the trial's owner, or, if it died between claiming and writing that, every process
    that tried to claim it (each writes claim:<host|pid|start> before claiming, and clears it on losing)."""
    a = t.user_attrs
    owners = [a["owner"]] if a.get("owner") else [_from_claim_key(k) for k, v in a.items()
                                                  if k.startswith("claim:") and v is not None]
    started = t.datetime_start.timestamp() if t.datetime_start else 0.0
    if not owners:  # asked by a search worker that died before its first write
        return time.time() - started > 30
    here = socket.gethostname()
    if any(o.get("host") != here for o in owners):
        return time.time() - (a.get("heartbeat") or started) > stale_after
    return not any(_alive(o) for o in owners)


def recover(study, stale_after: float) -> int:
    """Mark trials whose process died while RUNNING as FAIL (interrupted); enqueue_missing re-runs them."""
    from optuna.trial import TrialState

    dead = [t for t in retry(study.get_trials, deepcopy=False, states=(TrialState.RUNNING,)) if _stale(t, stale_after)]
    return sum(_mark_interrupted(study, t.number) for t in dead)


def _mark_interrupted(study, number: int) -> bool:
    """FAIL with ``interrupted`` set, so that enqueue_missing gives its point to a new trial; through the
    storage, as Optuna's Study has no setter for a trial another process holds. False if it finished
    meanwhile (or another process marked it first)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    study_id = retry(storage.get_study_id_from_name, study.study_name)
    tid = retry(storage.get_trial_id_from_study_id_trial_number, study_id, number)
    try:
        retry(storage.set_trial_user_attr, tid, "interrupted", True)
        return bool(retry(storage.set_trial_state_values, tid, TrialState.FAIL))
    except UpdateFinishedTrialError:
        return False


def withdraw_unfinished(study, stale_after: float) -> int:
    """``--finish``: end the study where it stands. Trials of dead processes are recovered as usual; trials
    still WAITING are marked FAIL (interrupted), like a killed one, so that a later plain sweep runs them
    again. A trial whose process is still alive (here, or heartbeating elsewhere within ``stale_after``) is
    never taken from it: the study cannot be finished while anyone works on it. Returns the trials withdrawn."""
    from optuna.trial import TrialState

    n = recover(study, stale_after)
    alive = retry(study.get_trials, deepcopy=False, states=(TrialState.RUNNING,))
    if alive:
        who = ", ".join(f"{t.number} ({(t.user_attrs.get('owner') or {}).get('host', '?')})" for t in alive)
        raise EdlabError(f"trial {who} still running: stop its sweep first, or wait --stale-after "
                         f"({stale_after:g} s) after its last heartbeat on another machine")
    waiting = retry(study.get_trials, deepcopy=False, states=(TrialState.WAITING,))
    return n + sum(_mark_interrupted(study, t.number) for t in waiting)


def _slot_states(study, retry_failed: bool) -> tuple[set[int], dict[int, dict]]:
    """Slots that are done or in progress, and for search the params of every slot drawn so far."""
    from optuna.trial import TrialState

    busy: set[int] = set()
    drawn: dict[int, dict] = {}
    for t in retry(study.get_trials, deepcopy=False):
        slot = t.user_attrs.get("slot")
        if slot is None:
            continue
        if t.params and slot not in drawn:
            drawn[slot] = dict(t.params)
        failed_for_real = t.state == TrialState.FAIL and not t.user_attrs.get("interrupted") and not retry_failed
        pruned = t.state == TrialState.PRUNED and t.user_attrs.get("pruned_at") is not None  # stopped by the pruner
        if t.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING) or failed_for_real or pruned:
            busy.add(slot)
    return busy, drawn


def enqueue_missing(st: Study, study, retry_failed: bool = False) -> int:
    """Enqueue each grid/list point (and each interrupted search draw) that no trial has done or holds."""
    busy, drawn = _slot_states(study, retry_failed)
    todo = [(i, p) for i, p in enumerate(st.points) if i not in busy] if st.mode != "search" else \
        [(s, p) for s, p in sorted(drawn.items()) if s not in busy]
    for slot, point in todo:
        retry(study.enqueue_trial, point, user_attrs={"slot": slot})
    return len(todo)


def _sqlite_file(study) -> str | None:
    """The database file of a SQLite storage, else None."""
    storage = getattr(study._storage, "_backend", study._storage)  # Optuna wraps RDBStorage in a cache
    url = getattr(getattr(storage, "engine", None), "url", None)
    if url is None or url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return url.database


@contextmanager
def _waiting_lock(study):
    """Held while a process turns a WAITING trial RUNNING. Optuna checks that a trial is WAITING and then
    sets it RUNNING; its SELECT ... FOR UPDATE makes that one step on PostgreSQL or MySQL, but SQLite has
    no row locks and reads outside the write transaction, so two workers could both take the same trial
    and run its point at once in the same run directory (the second then fails it, or clobbers the
    first's files). On SQLite an exclusive lock on a file beside the database makes the step atomic."""
    db = _sqlite_file(study)
    try:
        import fcntl
    except ImportError:  # not POSIX
        db = None
    if db is None:
        yield
        return
    with open(f"{db}.claim-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released by the kernel if this process dies holding it
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def missing_inputs(st: Study, slot: int | None) -> list[str]:
    """The input files a grid/list point names (a checkpoint, teacher or config, read from the study file's
    folder as the trial will read them) that do not exist yet: a long run's model.ckpt that is still being
    trained. Such a point stays WAITING instead of failing, and runs when a sweep finds its files."""
    from ..config import is_path_key, resolve_named_options

    if st.mode == "search" or slot is None or not 0 <= slot < len(st.points):
        return []
    point = resolve_named_options(st.points[slot], st.file)
    return [str(v) for k, v in point.items()
            if isinstance(v, str) and is_path_key(str(k)) and "data" not in str(k) and not Path(v).exists()]


def claim(study, st: Study | None = None):
    """Take one WAITING trial (RUNNING from now on), or None. Never creates a trial. With ``st``, a point
    whose input files are missing (:func:`missing_inputs`) is passed over and stays WAITING."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    study_id = retry(storage.get_study_id_from_name, study.study_name)
    me = _owner()
    for t in retry(study.get_trials, deepcopy=False, states=(TrialState.WAITING,)):
        if st is not None and missing_inputs(st, t.user_attrs.get("slot")):
            continue
        tid = retry(storage.get_trial_id_from_study_id_trial_number, study_id, t.number)
        try:
            retry(storage.set_trial_user_attr, tid, _claim_key(me), time.time())  # before: no unowned RUNNING
            with _waiting_lock(study):  # exactly one process gets each WAITING trial
                won = retry(storage.set_trial_state_values, tid, TrialState.RUNNING)
            if won:
                retry(storage.set_trial_user_attr, tid, "owner", me)
                return retry(optuna.trial.Trial, study, tid)
            retry(storage.set_trial_user_attr, tid, _claim_key(me), None)
        except UpdateFinishedTrialError:
            continue
    return None


def next_trial(st: Study, study):
    """A WAITING trial, else (search) a new draw while the budget lasts; surplus draws are dropped."""
    from optuna.trial import TrialState

    if st.budget_epochs is not None and spent_epochs(study) >= st.budget_epochs:
        return None  # the budget is spent: no trial starts (a re-run with a larger budget goes on)
    trial = claim(study, st)
    if trial is not None or st.mode != "search":
        return trial
    trials = retry(study.get_trials, deepcopy=False)
    slots = {t.user_attrs.get("slot") for t in trials if not t.user_attrs.get("surplus")}
    if len(slots - {None}) >= st.trials:
        return None
    with _waiting_lock(study):  # ask() too may take a WAITING trial (one enqueued meanwhile)
        trial = retry(study.ask)
    if trial.user_attrs.get("owner") is None:
        retry(trial.set_user_attr, "owner", _owner())
    if trial.user_attrs.get("slot") is None:
        retry(trial.set_user_attr, "slot", trial.number)
        origins = [t.number for t in retry(study.get_trials, deepcopy=False)
                   if t.user_attrs.get("slot") == t.number and not t.user_attrs.get("surplus")]
        if sum(n <= trial.number for n in origins) > st.trials:  # another worker drew the last one first
            retry(trial.set_user_attr, "surplus", True)
            retry(study.tell, trial, state=TrialState.PRUNED)
            return None
    return trial


def spent_epochs(study) -> float:
    """Training epochs the study's finished trials ran, every stage counted (a pruned trial: up to its stop)."""
    return sum(t.user_attrs.get("epochs_run") or 0.0 for t in retry(study.get_trials, deepcopy=False)
               if t.state.name in ("COMPLETE", "PRUNED"))
