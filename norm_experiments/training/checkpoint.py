"""Resumable checkpoints: everything needed to continue a run exactly, written atomically.

Every file is opened with torch's safe loader (`weights_only=True`: tensors, plain containers and numbers),
so a crafted checkpoint.pt or model.pt in a run folder cannot run code when it is opened. Everything a
checkpoint holds is stored in that form, the RNG states included. A file that needs any other type (a
checkpoint written before this format, or a file from elsewhere) is refused unless the caller trusts it.

What a file holds is then checked before anything uses it (check_tensors, check_weights): every tensor dense,
of a real dtype (complex values pass a NaN check that looks at floating point only; float8 has no isfinite),
no larger than the storage it views (4 bytes can be saved as a 2^20 x 2^20 tensor of stride 0, which any
operation turns into terabytes); a state dict's keys are parameter names and its values finite.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import random
import re
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import torch

from norm_experiments import safe_io
from norm_experiments.errors import UserError
from norm_experiments.run_record import write_atomic

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"  # the latest resumable state
BEST_WEIGHTS = "best_model.pt"  # weights at the best validation Dice
FINAL_WEIGHTS = "model.pt"  # weights at the end of training
TRUST_FLAG = "trainer.trust_checkpoint=true"  # the opt-in that lets a trusted old file be unpickled
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "state", "rng")

# torch's refusal names the global it would have had to import, e.g. "Unsupported global: GLOBAL posix.system"
_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")


def rng_states() -> dict:
    """Every global RNG a run touches, as lists, numbers and tensors (what the safe loader restores).
    Data sampling and augmentation need none: they are re-seeded from (seed, step) for every batch (see
    data.pipeline.BatchSampler)."""
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    states = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "name": str(name),
            "key": key.tolist(),  # 624 uint32 words: plain ints, not an ndarray
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Restore what rng_states() saved. A checkpoint of an earlier version (loaded with the trust opt-in)
    holds the tuples random.getstate() and np.random.get_state() return: those are set as they are."""
    python = states["python"]
    if isinstance(python, dict):
        python = (python["version"], tuple(python["internal"]), python["gauss_next"])
    random.setstate(python)
    numpy = states["numpy"]
    if isinstance(numpy, dict):
        key = np.asarray(numpy["key"], dtype=np.uint32)
        numpy = (numpy["name"], key, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    np.random.set_state(numpy)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save(path: Path, state: dict) -> None:
    """Serialize to memory first, then write atomically: a crash or a full disk keeps the previous file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        write_atomic(path, buffer.getvalue())
    except OSError as err:
        raise UserError(
            f"could not write {path}: {safe_io.os_reason(err)}; the previous file is kept"
        ) from err


def load(path: Path, trust: bool = False) -> dict:
    """A resumable checkpoint, opened safely; trust=True (trainer.trust_checkpoint) also opens a checkpoint
    of an earlier version, by unpickling it. It is then saved again in the safe form at the next checkpoint."""
    saved = _load(path, trust, TRUST_FLAG, "move it away to restart")
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(saved, dict) or key not in saved]
    if missing:
        raise UserError(f"{path}: not a checkpoint of this project (no {', '.join(missing)}); move it away")
    if isinstance(saved["model"], dict):  # a checkpoint never holds a diverged state (training.loop)
        check_weights(path, saved["model"])
    return saved


def save_run(path: Path, run_id: str, built, state: dict) -> None:
    """A resumable checkpoint of a run: model, optimizer, schedule, loss scaler, the loop's state and every
    RNG state (built: training.build.Built)."""
    save(
        path,
        {
            "run_id": run_id,
            "model": built.model.state_dict(),
            "optimizer": built.optimizer.state_dict(),
            "scheduler": built.scheduler.state_dict(),
            "scaler": built.scaler.state_dict(),
            "state": state,
            "rng": rng_states(),
        },
    )


def restore_run(path: Path, built, trust: bool = False) -> dict:
    """Load a run's checkpoint into its built parts and the global RNGs; returns the loop's saved state."""
    saved = load(path, trust=trust)
    check_fits(saved["model"], built.model, path)
    built.model.load_state_dict(saved["model"])
    built.optimizer.load_state_dict(saved["optimizer"])
    built.scheduler.load_state_dict(saved["scheduler"])
    built.scaler.load_state_dict(saved["scaler"])
    restore_rng_states(saved["rng"])
    return saved["state"]


def check_fits(state: dict, model: torch.nn.Module, path: Path) -> None:
    """Refuse, in one line, weights that do not fit `model` (a checkpoint of another norm or model, e.g.
    trainer.force_resume=true after changing the norm), naming the first differences."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = [
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
        ]
        parts.append(f"shapes differ: {', '.join(shapes[:2])}" if shapes else "")
        raise UserError(
            f"{path}: its weights do not fit this model ({'; '.join(p for p in parts if p)}): it was saved by "
            "another model or norm; use trainer.overwrite=true to train this config from scratch"
        )


def load_weights(path: Path, trust: bool = False, trust_flag: str = TRUST_FLAG) -> dict:
    """Model weights from a file someone hands the project: a state dict (model.pt, best_model.pt) or a
    full checkpoint's "model" entry. Opened with the safe loader; a file that needs any other type is
    refused with a UserError naming that type and `trust_flag` (the caller's opt-in, which sets trust)."""
    saved = _load(path, trust, trust_flag, "it holds no weights this project can read")
    if isinstance(saved, torch.nn.Module):  # a whole network, pickled (torch.save(net)): only trust opens one
        saved = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in saved.state_dict().items()}
        check_tensors(path, saved)
    if isinstance(saved, dict) and isinstance(saved.get("model"), dict):
        saved = saved["model"]
    if not isinstance(saved, dict) or not any(isinstance(v, torch.Tensor) for v in saved.values()):
        keys = (
            ", ".join(repr(k) for k in list(saved)[:6]) if isinstance(saved, dict) else type(saved).__name__
        )
        raise UserError(
            f"{path}: holds no model weights (found {keys}); give a state dict (torch.save(net.state_dict())) or "
            "a checkpoint holding one under 'model' (for a checkpoint with its own key, save that entry alone)"
        )
    check_weights(path, saved)
    return saved


# The dtypes a network's state dict (ours, MONAI's) or a checkpoint holds: floating point weights, integer
# counters (num_batches_tracked, optimizer steps), bytes (RNG states), booleans.
WEIGHT_DTYPES = frozenset(
    {
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    }
)
# All views of a file's tensors together: tied weights count twice, slices of one flat buffer once; far more
# than this means views that overlap or repeat values, which cost memory the file does not hold.
MAX_VIEW_BYTES_PER_FILE_BYTE = 4


def check_tensors(path: Path, saved: object) -> None:
    """Refuse, naming the tensor, a file whose tensors cannot be used as they are: a layout other than dense
    (sparse), a dtype outside WEIGHT_DTYPES (complex, float8, quantized), a view larger than its storage, or
    views that together take far more memory than the file holds. Nothing is computed on a tensor here."""
    try:
        file_bytes = os.stat(path).st_size
    except OSError:
        file_bytes = 0
    total = 0
    for where, tensor in _tensors(saved):
        if tensor.layout != torch.strided:
            raise UserError(f"{path}: {where} is a {tensor.layout} tensor; weights are dense tensors")
        if tensor.dtype not in WEIGHT_DTYPES:
            raise UserError(
                f"{path}: {where} holds {str(tensor.dtype).removeprefix('torch.')} values: no network of this "
                "project or of MONAI has them, and a check for NaN in real weights would let them pass; weights "
                "are float16, bfloat16, float32 or float64"
            )
        view = tensor.numel() * tensor.element_size()
        storage = tensor.untyped_storage().nbytes()
        if view > storage:
            raise UserError(
                f"{path}: {where} is a {'x'.join(map(str, tensor.shape))} view of {view} bytes, larger than "
                f"the {storage} bytes of storage it views; a file of real weights stores every value"
            )
        total += view
    if total > MAX_VIEW_BYTES_PER_FILE_BYTE * max(file_bytes, 2**20):
        raise UserError(
            f"{path}: its tensors view {total / 2**20:.0f} MiB of values stored in a {file_bytes / 2**20:.1f} MiB "
            "file (the same values viewed over and over); a file of real weights stores every value"
        )


def _tensors(saved: object):
    """(where, tensor) for every tensor in nested dicts, lists and tuples, without recursion."""
    stack: list[tuple[str, object]] = [("", saved)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, torch.Tensor):
            yield where or "the tensor", node
        elif isinstance(node, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(node))


def check_weights(path: Path, weights: dict) -> None:
    """A state dict's keys are parameter names (strings), and weights with NaN or infinite values score
    nothing real (every output NaN): refused, naming a key. After check_tensors (isfinite allocates one flag
    per value: it must not run on a view larger than its storage)."""
    for key, value in weights.items():
        if not isinstance(key, str):
            raise UserError(
                f"{path}: the key {key!r} ({type(key).__name__}) is not a parameter name; not the state dict "
                "of a network"
            )
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise UserError(
                f"{path}: {key} holds {bad} NaN or infinite value(s); these weights score nothing"
            )
        if key.endswith("running_var") and isinstance(value, torch.Tensor) and bool((value < 0).any()):
            raise UserError(  # a variance below 0 is no variance: its square root makes every output NaN
                f"{path}: {key} holds {int((value < 0).sum())} negative variance(s); not the statistics of any data"
            )


def _load(path: Path, trust: bool, trust_flag: str, hint: str) -> object:
    """What the file holds (_unpickle), its tensors checked (check_tensors) before anything uses them."""
    saved = _unpickle(path, trust, trust_flag, hint)
    check_tensors(path, saved)
    return saved


def _unpickle(path: Path, trust: bool, trust_flag: str, hint: str) -> object:
    """torch.load with the safe loader. A file that needs other types is refused unless trust is set;
    with trust, it is unpickled (which can run code) and a warning says so."""
    try:
        with safe_io.open_regular(
            path, safe_io.memory_bytes()
        ) as f:  # a FIFO would block, /dev/zero fill memory
            if _is_torchscript(f):
                raise UserError(
                    f"{path}: a TorchScript archive (torch.jit.save), not a state dict; save the weights with "
                    "torch.save(model.state_dict(), PATH) and give that file"
                )
            return torch.load(f, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except safe_io.UnsafeFile as err:
        raise UserError(str(err)) from None
    except pickle.UnpicklingError as err:
        needed = _UNSAFE_GLOBAL.search(str(err))
        if not trust and needed is None:  # e.g. an opcode the safe loader does not know: a damaged file
            raise UserError(f"{path}: not a readable checkpoint ({_reason(err)}); {hint}") from err
        if not trust:
            raise UserError(
                f"{path}: refused: it needs {needed.group(1)}, and unpickling it could run code (a file of an "
                f"earlier version, or from elsewhere); if you trust its source, add {trust_flag} to load it"
            ) from err
    except FileNotFoundError as err:
        raise UserError(f"{path}: no such file") from err
    except Exception as err:  # a truncated or foreign file: say which, never guess
        raise UserError(f"{path}: not a readable checkpoint ({err.__class__.__name__}); {hint}") from err
    log.warning("%s: unpickling it with the unsafe loader, as %s asks", path, trust_flag)
    try:
        with safe_io.open_regular(path, safe_io.memory_bytes()) as f:
            return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(f"{path}: not a readable checkpoint ({err.__class__.__name__}); {hint}") from err


def _is_torchscript(f) -> bool:  # noqa: ANN001 - a binary file object
    """A TorchScript archive: a zip with a constants.pkl record (torch.load would hand it to torch.jit.load,
    printing a warning, and refuse it under weights_only). Leaves the file at its start."""
    try:
        if not zipfile.is_zipfile(f):
            return False
        f.seek(0)
        return any(name.endswith("/constants.pkl") for name in zipfile.ZipFile(f).namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False  # torch.load then says what it is
    finally:
        f.seek(0)


def _reason(err: Exception) -> str:
    """The reason in torch's multi-line refusal (e.g. "Unsupported operand 103")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reasons = [line for line in lines if line.startswith("Unsupported")]
    return textwrap.shorten((reasons or lines or [err.__class__.__name__])[0], 160, placeholder=" ...")
