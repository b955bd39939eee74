"""A/B experiments over strategies, from a TOML file:

    [experiments.prag-vs-rag]
    arms = [
      { name = "a", strategy = "rag", weight = 1 },
      { name = "b", strategy = "prag+rag", weight = 1, top_k = 5 },
    ]

A request joins with ``X-Experiment: NAME``. Its arm is a deterministic function of the
experiment name and the user (OpenAI ``user`` field or ``X-User-Id``): sha256 of both,
read as a number in [0, 1), falls into the arm whose share of the cumulative weights
covers it. The same user therefore stays in one arm, and across users the arms fill in
proportion to their weights. Without a user the arm is drawn at random.

Every arm key other than name, strategy and weight is a request parameter the arm
sets (``top_k`` or any strategy option such as ``ckplug_alpha``); an arm's values win
over the request's, since they are the treatment being compared.

The file is re-read when it changes (checked on use, by modification time and size) or
on ``POST /v1/experiments/reload``. A file that does not parse or validate is rejected
with the line at fault and the previous configuration stays live.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import threading
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from ..options import RequestOptions

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
# request parameters an arm may set, with the type each must have
ARM_PARAMS = {"top_k": int, "ckplug_alpha": (int, float, str), "ckplug_condition": str,
              "ckplug_epsilon": (int, float), "ckplug_variant": str, "kv_recompute": (int, float),
              "kv_recompute_refresh": bool, "kv_link_tokens": int,
              "kv_positions": str, "kv_temperature": (int, float), "kv_scale": (int, float),
              "on_missing": str}


class ExperimentError(ValueError):
    pass


@dataclass(frozen=True)
class Arm:
    name: str
    strategy: str
    weight: float
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    name: str
    arms: tuple[Arm, ...]

    def assign(self, user: Optional[str], rng: random.Random) -> Arm:
        total = sum(a.weight for a in self.arms)
        if user:
            h = hashlib.sha256(f"{self.name}\x00{user}".encode()).digest()
            u = int.from_bytes(h[:8], "big") / 2.0 ** 64
        else:
            u = rng.random()
        acc = 0.0
        for arm in self.arms:
            acc += arm.weight / total
            if u < acc:
                return arm
        return self.arms[-1]


def parse(text: str, known_strategies: list[str], source: str = "experiments") -> dict[str, Experiment]:
    """Parse and validate a whole file; ExperimentError names the place at fault."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ExperimentError(f"{source}: {e}") from None  # tomllib's message carries line and column
    exps = data.get("experiments", {})
    unknown_top = set(data) - {"experiments"}
    if unknown_top:
        raise ExperimentError(f"{source}: unknown top-level table(s) {', '.join(sorted(unknown_top))}; "
                              "put experiments under [experiments.NAME]")
    if not isinstance(exps, dict):
        raise ExperimentError(f"{source}: 'experiments' must be a table of [experiments.NAME]")
    out = {}
    for name, body in exps.items():
        where = f"{source}: experiments.{name}"
        if not NAME_RE.match(name):
            raise ExperimentError(f"{where}: a name is 1-64 letters, digits, '.', '_', '+' or '-'")
        if not isinstance(body, dict) or not isinstance(body.get("arms"), list) or not body["arms"]:
            raise ExperimentError(f"{where}: needs a non-empty list 'arms'")
        arms, seen = [], set()
        for i, raw in enumerate(body["arms"]):
            at = f"{where}.arms[{i}]"
            if not isinstance(raw, dict):
                raise ExperimentError(f"{at}: an arm is a table {{ name = ..., strategy = ..., weight = ... }}")
            arm_name, strategy, weight = raw.get("name"), raw.get("strategy"), raw.get("weight", 1)
            if not isinstance(arm_name, str) or not NAME_RE.match(arm_name):
                raise ExperimentError(f"{at}: 'name' must be 1-64 letters, digits, '.', '_', '+' or '-'")
            if arm_name in seen:
                raise ExperimentError(f"{at}: arm name {arm_name!r} is used twice")
            seen.add(arm_name)
            if strategy not in known_strategies:
                raise ExperimentError(f"{at}: unknown strategy {strategy!r}; known: {', '.join(known_strategies)}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
                raise ExperimentError(f"{at}: 'weight' must be a positive number, got {weight!r}")
            params = {k: v for k, v in raw.items() if k not in ("name", "strategy", "weight")}
            for k, v in params.items():
                if k not in ARM_PARAMS:
                    raise ExperimentError(f"{at}: unknown parameter {k!r}; an arm may set {', '.join(ARM_PARAMS)}")
                if isinstance(v, bool) != (ARM_PARAMS[k] is bool) or not isinstance(v, ARM_PARAMS[k]):
                    raise ExperimentError(f"{at}: {k} has the wrong type ({type(v).__name__})")
                if k == "top_k" and not 1 <= v <= 100:
                    raise ExperimentError(f"{at}: top_k must be between 1 and 100")
            try:  # the ranges a request's own values must fall in (server.options)
                RequestOptions.model_validate(params)
            except ValidationError as e:
                first = e.errors()[0]
                field = ".".join(str(x) for x in first["loc"])
                raise ExperimentError(f"{at}: {field}: {first['msg']}") from None
            arms.append(Arm(arm_name, strategy, float(weight), params))
        extra = set(body) - {"arms"}
        if extra:
            raise ExperimentError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        out[name] = Experiment(name, tuple(arms))
    return out


class Experiments:
    """The live configuration, reloaded from its file when it changes."""

    def __init__(self, path: Optional[Path], known_strategies: list[str], seed: Optional[int] = None):
        self.path = Path(path) if path is not None else None
        self.known = list(known_strategies)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._experiments: dict[str, Experiment] = {}
        self._stamp = None
        self.last_error: Optional[str] = None
        self.loaded_at: Optional[float] = None
        self.counts: Counter = Counter()  # (experiment, arm) -> requests assigned since start
        if self.path is not None:
            self.reload(strict=True)

    def _file_stamp(self):
        st = self.path.stat()
        return (st.st_mtime_ns, st.st_size)

    def reload(self, strict: bool = False) -> None:
        """Re-read the file. A bad file raises ExperimentError (and, unless ``strict`` at
        start-up, leaves the previous configuration live)."""
        import time

        if self.path is None:
            raise ExperimentError("no experiments file is configured (knowmux serve --experiments FILE)")
        try:
            stamp = self._file_stamp()
            parsed = parse(self.path.read_text(encoding="utf-8"), self.known, source=str(self.path))
        except (OSError, UnicodeDecodeError) as e:
            parsed, err = None, ExperimentError(f"{self.path}: cannot read: {e}")
        except ExperimentError as e:
            parsed, err = None, e
        if parsed is None:
            with self._lock:
                self.last_error = str(err)
            log.error("experiments config rejected, keeping the previous one: %s", err)
            raise err
        with self._lock:
            self._experiments, self._stamp, self.last_error = parsed, stamp, None
            self.loaded_at = time.time()
        log.info("experiments loaded from %s: %s", self.path, ", ".join(parsed) or "(none)")

    def _maybe_reload(self) -> None:
        if self.path is None:
            return
        try:
            stamp = self._file_stamp()
        except OSError:
            return  # a file being replaced; keep what we have
        if stamp != self._stamp:
            try:
                self.reload()
            except ExperimentError:
                with self._lock:
                    self._stamp = stamp  # do not re-parse the same bad file on every request

    def get(self, name: str) -> Experiment:
        self._maybe_reload()
        with self._lock:
            exp = self._experiments.get(name)
            known = list(self._experiments)
        if exp is None:
            raise KeyError(f"no experiment named {name!r}; configured: {', '.join(known) or 'none'}")
        return exp

    def assign(self, name: str, user: Optional[str]) -> Arm:
        exp = self.get(name)
        with self._lock:
            arm = exp.assign(user, self._rng)
            self.counts[(name, arm.name)] += 1
        return arm

    def describe(self) -> dict:
        self._maybe_reload()
        with self._lock:
            return {"file": str(self.path) if self.path else None, "loaded_at": self.loaded_at,
                    "last_error": self.last_error,
                    "experiments": [{"name": e.name, "arms": [
                        {"name": a.name, "strategy": a.strategy, "weight": a.weight, "params": a.params,
                         "requests": self.counts[(e.name, a.name)]} for a in e.arms]}
                        for e in self._experiments.values()]}
