"""Put a trained student into a running inference server: LoRA adapters at runtime, full weights by reload.

    from opsd.serve.adapters import publish_adapter
    name = publish_adapter(server, "runs/loop/round_0/train", previous=old_name)   # -> "round_0-3f2a9c1b7e"
    # rollouts now ask for model=name; the server lists it in /v1/models

Endpoints (the client speaks both):
- vLLM (started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): POST /v1/load_lora_adapter
  {"lora_name", "lora_path"}, POST /v1/unload_lora_adapter {"lora_name"}; requests name the adapter
  as the model; /v1/models lists it with `root` = its path and `parent` = the base model.
- SGLang: POST /load_lora_adapter {"lora_name", "lora_path"} and /unload_lora_adapter {"lora_name"}
  (answer: {"success", "error_message", "loaded_adapters"}); requests name "BASE:ADAPTER";
  POST /update_weights_from_disk {"model_path"} swaps full weights in place.

An adapter's served name carries a hash of its files, so a retrained adapter never hides behind an
old name. opsd trains round k+1 on top of round k's adapter (merged), so round k+1's adapter is
stacked on round k's; a server applies adapters to the base model only, so a stacked chain is
first flattened into one exact adapter (ranks add up: [B0*s0, B1*s1] @ [A0; A1]).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import httpx

from opsd.types import ServerError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SERVED_RECORD = "served.json"  # written next to a published adapter: name, path, hash, base
_HASH_CACHE: dict[tuple, str] = {}


class AdapterError(ServerError):
    """A student could not be put into the server (bad adapter, refused load, not listed afterwards)."""


def files_hash(path: str | Path, suffixes=(".safetensors", ".bin", ".json")) -> str:
    """sha256 (first 16 hex) over the names and contents of a model/adapter dir's weight and config files."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in suffixes and f.name != SERVED_RECORD)
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key in _HASH_CACHE:
        return _HASH_CACHE[key]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    _HASH_CACHE[key] = h.hexdigest()[:16]
    return _HASH_CACHE[key]


def find_adapter_dir(path: str | Path) -> Path:
    """The adapter dir of a train run (RUN/model) or the dir itself; AdapterError when there is none."""
    p = Path(path)
    for cand in (p, p / "model"):
        if (cand / ADAPTER_CONFIG).is_file():
            return cand
    if (p / "model" / "config.json").is_file() or (p / "config.json").is_file():
        raise AdapterError(f"{p}: holds full weights, not a LoRA adapter; train with --lora-r N to hot-load rounds, "
                           "or restart the server on the new weights")
    raise AdapterError(f"{p}: no {ADAPTER_CONFIG} here or in {p / 'model'} (expected a LoRA adapter saved by opsd train)")


# ----------------------------------------------------------------------------- flattening stacked adapters
def adapter_chain(adapter_dir: Path) -> tuple[list[Path], str]:
    """Adapters from the one nearest the base to `adapter_dir`, and the base model they sit on."""
    chain, cur = [], Path(adapter_dir)
    while True:
        if cur in chain or len(chain) > 64:
            raise AdapterError(f"{adapter_dir}: adapter chain loops through {cur}")
        chain.append(cur)
        base = json.loads((cur / ADAPTER_CONFIG).read_text("utf-8")).get("base_model_name_or_path")
        if not base:
            raise AdapterError(f"{cur / ADAPTER_CONFIG}: base_model_name_or_path is missing")
        bp = Path(base).expanduser()
        if not (bp / ADAPTER_CONFIG).is_file():
            return chain[::-1], base
        cur = bp


def _lora_scale(cfg: dict, where: Path) -> float:
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if cfg.get(key):
            raise AdapterError(f"{where / ADAPTER_CONFIG}: {key} is set; only plain LoRA adapters can be flattened")
    if cfg.get("use_dora"):
        raise AdapterError(f"{where / ADAPTER_CONFIG}: DoRA adapters cannot be flattened into one LoRA")
    r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
    return alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r


def flatten_adapters(chain: list[Path], base: str, dest: Path) -> Path:
    """One LoRA adapter equal to applying `chain` in order on `base`: W + sum_i s_i B_i A_i = W + B A, where
    A stacks the A_i (rows) and B the s_i B_i (columns), with alpha = rank so the new scale is 1."""
    import torch
    from safetensors.torch import load_file, save_file

    parts = []  # (scale, state dict, config)
    for d in chain:
        cfg = json.loads((d / ADAPTER_CONFIG).read_text("utf-8"))
        parts.append((_lora_scale(cfg, d), load_file(str(d / ADAPTER_WEIGHTS)), cfg))
    prefixes = sorted({k[: -len(".lora_A.weight")] for _, sd, _ in parts for k in sd if k.endswith(".lora_A.weight")})
    rank = sum(cfg["r"] for *_, cfg in parts)
    out: dict[str, torch.Tensor] = {}
    for prefix in prefixes:
        a_rows, b_cols = [], []
        shape_a = shape_b = None
        for _, sd, _ in parts:
            if prefix + ".lora_A.weight" in sd:
                shape_a, shape_b = sd[prefix + ".lora_A.weight"].shape[1:], sd[prefix + ".lora_B.weight"].shape[:1]
        for scale, sd, cfg in parts:
            a = sd.get(prefix + ".lora_A.weight")  # (r_i, in)
            b = sd.get(prefix + ".lora_B.weight")  # (out, r_i)
            if a is None:  # this adapter does not touch the module: a zero block keeps the rank layout
                a, b = torch.zeros(cfg["r"], *shape_a), torch.zeros(*shape_b, cfg["r"])
            a_rows.append(a.float())
            b_cols.append(b.float() * scale)
        out[prefix + ".lora_A.weight"] = torch.cat(a_rows, 0).contiguous()  # (rank, in)
        out[prefix + ".lora_B.weight"] = torch.cat(b_cols, 1).contiguous()  # (out, rank)
    cfg = dict(parts[-1][2])
    targets = set()
    for *_, c in parts:
        t = c.get("target_modules") or []
        targets |= {t} if isinstance(t, str) else set(t)
    cfg.update(r=rank, lora_alpha=rank, use_rslora=False, base_model_name_or_path=base,
               target_modules=sorted(targets) if "all-linear" not in targets else "all-linear")
    dest.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dest / ADAPTER_WEIGHTS))
    (dest / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2), "utf-8")
    (dest / "opsd_flattened_from.json").write_text(json.dumps([str(d) for d in chain], indent=2), "utf-8")
    return dest


def servable_adapter(adapter_dir: Path) -> tuple[Path, str, int]:
    """(dir the server can load, base model, rank): `adapter_dir` itself, or its flattened chain."""
    chain, base = adapter_chain(adapter_dir)
    if len(chain) == 1:
        cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text("utf-8"))
        return adapter_dir, base, int(cfg["r"])
    dest = adapter_dir.parent / (adapter_dir.name + "-flat")
    stamp = dest / "opsd_flattened_from.json"
    if not (stamp.is_file() and json.loads(stamp.read_text("utf-8")) == [str(d) for d in chain]
            and (dest / ADAPTER_WEIGHTS).stat().st_mtime_ns >= (adapter_dir / ADAPTER_WEIGHTS).stat().st_mtime_ns):
        flatten_adapters(chain, base, dest)
    return dest, base, int(json.loads((dest / ADAPTER_CONFIG).read_text("utf-8"))["r"])


# ----------------------------------------------------------------------------- the client
class AdapterClient:
    """LoRA load/unload (vLLM or SGLang endpoints) and /v1/models, against `root_url` (no /v1)."""

    def __init__(self, root_url: str, *, engine: str = "vllm", base_model: str | None = None, timeout: float = 300.0):
        if engine not in ("vllm", "sglang"):
            raise ValueError(f"engine: expected vllm or sglang, got {engine!r}")
        self.root_url, self.engine, self.base_model, self.timeout = root_url.rstrip("/"), engine, base_model, timeout

    def _post(self, route: str, body: dict) -> httpx.Response:
        try:
            return httpx.post(self.root_url + route, json=body, timeout=self.timeout)
        except httpx.HTTPError as e:
            raise ServerError(f"{self.root_url}{route}: cannot reach the server ({type(e).__name__}: {e})") from None

    def models(self) -> list[dict]:
        try:
            r = httpx.get(self.root_url + "/v1/models", timeout=self.timeout)
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise ServerError(f"{self.root_url}/v1/models: cannot reach the server ({type(e).__name__}: {e})") from None
        return r.json().get("data", [])

    def request_model(self, adapter: str | None) -> str:
        """The `model` field that selects `adapter` (None: the base model) in OpenAI requests."""
        if adapter is None:
            return self.base_model or ""
        return f"{self.base_model}:{adapter}" if self.engine == "sglang" and self.base_model else adapter

    def load(self, name: str, path: str | Path) -> dict:
        route = "/v1/load_lora_adapter" if self.engine == "vllm" else "/load_lora_adapter"
        r = self._post(route, {"lora_name": name, "lora_path": str(path)})
        body = _json_or_text(r)
        ok = r.status_code == 200 and (self.engine == "vllm" or (isinstance(body, dict) and body.get("success", True)))
        if not ok:
            raise AdapterError(f"the {self.engine} server refused adapter {name!r} from {path}: "
                               f"HTTP {r.status_code}: {_message(body)}")
        return body if isinstance(body, dict) else {"message": body}

    def unload(self, name: str) -> None:
        route = "/v1/unload_lora_adapter" if self.engine == "vllm" else "/unload_lora_adapter"
        r = self._post(route, {"lora_name": name})
        if r.status_code != 200:
            raise AdapterError(f"the {self.engine} server could not unload {name!r}: HTTP {r.status_code}: "
                               f"{_message(_json_or_text(r))}")

    def update_weights(self, model_path: str | Path) -> None:
        """Full weights in place (SGLang's /update_weights_from_disk); vLLM needs a restart instead."""
        if self.engine != "sglang":
            raise AdapterError("vLLM cannot swap full weights at runtime: restart it on the new model dir "
                               "(VLLMServer(ServeConfig(model=DIR)).start()) or train with --lora-r")
        r = self._post("/update_weights_from_disk", {"model_path": str(model_path)})
        body = _json_or_text(r)
        if r.status_code != 200 or (isinstance(body, dict) and not body.get("success", True)):
            raise AdapterError(f"SGLang could not load weights from {model_path}: HTTP {r.status_code}: {_message(body)}")

    def listed(self, name: str) -> dict | None:
        """The /v1/models entry of `name` (or of BASE:name on SGLang), None when the server does not list it."""
        wanted = {name, self.request_model(name)}
        return next((m for m in self.models() if m.get("id") in wanted), None)


def _json_or_text(r: httpx.Response):
    try:
        return r.json()
    except ValueError:
        return r.text


def _message(body) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        msg = (err.get("message") if isinstance(err, dict) else err) or body.get("error_message") or body.get("message")
        return str(msg or body)[:500]
    return str(body)[:500]


def client_for(server) -> AdapterClient:
    """An AdapterClient for a VLLMServer (or anything with root_url, engine and model_name); a client as is."""
    if isinstance(server, AdapterClient):
        return server
    return AdapterClient(server.root_url, engine=getattr(server, "engine", "vllm"), base_model=server.model_name)


def publish_adapter(server, round_dir: str | Path, *, previous: str | None = None, label: str | None = None) -> str:
    """Load the student trained in `round_dir` (a train run or its model dir) into `server` (a VLLMServer, or
    an AdapterClient for a server started elsewhere), unload `previous`,
    and return the name rollouts must ask for. Raises AdapterError (nothing changed on the server except a
    possibly half-loaded new name) when the adapter is not servable, is refused, or is not listed afterwards."""
    from opsd.io.models import resolve

    adapter_dir = find_adapter_dir(round_dir)
    path, base, rank = servable_adapter(adapter_dir)
    cfg = getattr(server, "cfg", None)
    if cfg is not None:
        if str(resolve(base)) != str(resolve(cfg.model)):
            raise AdapterError(f"{adapter_dir}: trained on {base}, but the server serves {cfg.model}")
        if rank > cfg.max_lora_rank:
            raise AdapterError(f"{adapter_dir}: LoRA rank {rank} exceeds the server's --max-lora-rank "
                               f"{cfg.max_lora_rank}; start it with ServeConfig(max_lora_rank=...) >= {rank}")
    digest = files_hash(path)
    name = f"{label or Path(round_dir).name}-{digest[:10]}"
    client = client_for(server)
    listed = client.listed(name)
    if listed is None:
        client.load(name, path.resolve())
        listed = client.listed(name)
        if listed is None and client.engine == "vllm":
            raise AdapterError(f"adapter {name!r} was accepted but /v1/models does not list it")
    if getattr(server, "adapters", None) is not None:
        server.adapters[name] = str(path.resolve())
    if previous and client.engine == "sglang" and ":" in previous:
        previous = previous.split(":", 1)[1]  # the request name BASE:ADAPTER -> the adapter's name
    if previous and previous not in (name, client.base_model):  # the base model is never unloaded
        try:
            client.unload(previous)
        except AdapterError as e:  # the new adapter is in place; a stale one left loaded only costs memory
            log.warning("%s", e)
        if getattr(server, "adapters", None) is not None:
            server.adapters.pop(previous, None)
    record = {"name": name, "request_model": client.request_model(name), "path": str(path.resolve()),
              "adapter_dir": str(adapter_dir.resolve()), "hash": digest, "base": base, "rank": rank}
    (adapter_dir / SERVED_RECORD).write_text(json.dumps(record, indent=2), "utf-8")
    log.info("published %s (%s) into %s", name, path, client.root_url)
    return client.request_model(name)


def served_weights(client: AdapterClient, model: str) -> dict:
    """Which weights answer requests for `model`: {"model", "adapter", "path", "hash"} from /v1/models (the
    hash is over the files at the listed path when they are on this machine). AdapterError if not listed."""
    models = client.models()
    ids = {m.get("id"): m for m in models}
    base, sep, adapter = model.partition(":")  # SGLang names an adapter BASE:ADAPTER in requests
    entry = ids.get(model) or (ids.get(adapter) if sep and base in ids else None)
    if entry is None:
        raise AdapterError(f"the server does not serve {model!r}; it lists {sorted(i for i in ids if i)}")
    root = entry.get("root")
    is_adapter = bool(entry.get("parent")) or (root is not None and (Path(root) / ADAPTER_CONFIG).is_file())
    digest = files_hash(root) if root and Path(root).is_dir() else None
    return {"model": model, "adapter": entry.get("id") if is_adapter else None, "path": root, "hash": digest}


def publish_full_weights(server, model_dir: str | Path) -> str:
    """Serve a fully fine-tuned student: SGLang swaps the weights in place (/update_weights_from_disk); a
    VLLMServer is restarted on `model_dir` (runtime adapters are reloaded). Returns the model name to ask for;
    AdapterError when the server does not then serve `model_dir`."""
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise AdapterError(f"{model_dir}: no config.json (expected full weights saved by opsd train --lora-r 0)")
    client = client_for(server)
    if client.engine == "sglang":
        client.update_weights(model_dir)
    elif hasattr(server, "restart") and hasattr(server, "cfg"):
        server.cfg.model = str(model_dir)
        server.restart()
    else:
        raise AdapterError("vLLM cannot swap full weights at runtime: restart it with --model on the new dir")
    weights = served_weights(client, client.base_model)
    if weights["path"] is not None and Path(weights["path"]).resolve() != model_dir:
        raise AdapterError(f"the server still serves {weights['path']}, not {model_dir}")
    return client.base_model
