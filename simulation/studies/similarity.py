"""How alike users' personal adapters are (paper appendix G): pairwise cosine similarity, summary, heatmap.

An analysis on the machine that holds the node stores (the simulation's run directory): it reads every
test user's adapter from `clients/<user>/adapters/user-<user>-<variant>/`. Personal adapters never travel
in Flower messages, and nothing here goes through Flower either.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from client.adapters import personal_adapter_name
from common.store import (
    UserStore,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)

ADAPTER_FILE = "adapter_model.safetensors"


def _adapter_files(run_dir: Path, variant: str) -> dict[str, Path]:
    """{user: adapter weights file} for every node store holding that user's `variant` adapter."""
    files = {}
    for user_dir in sorted((run_dir / "clients").glob("*/")):
        user = user_dir.name
        path = UserStore(run_dir, user).adapter(personal_adapter_name(user, variant)) / ADAPTER_FILE
        if path.is_file():
            files[user] = path
    return files


def _mean_tensor_cosine(states: list[dict[str, torch.Tensor]], users: list[str]) -> torch.Tensor:
    """[U, U]: per tensor, the cosine of the flattened weights; averaged over tensors (zero tensors count 0)."""
    names = sorted(states[0])
    for user, state in zip(users, states):
        if sorted(state) != names:
            raise ValueError(f"user {user!r}: adapter tensors differ from user {users[0]!r}'s (another PEFT config?)")
    total = torch.zeros(len(states), len(states), dtype=torch.float64)
    for name in names:
        shapes = {tuple(state[name].shape) for state in states}
        if len(shapes) != 1:
            raise ValueError(f"adapter tensor {name!r} has different shapes across users: {sorted(shapes)}")
        rows = torch.stack([state[name].flatten().to(torch.float64) for state in states])  # [U, D]
        unit = torch.nn.functional.normalize(rows, dim=1)
        total += unit @ unit.T
    return total / len(names)


def similarity_inputs(run_dir: Path, variant: str = "k0") -> dict[str, Path]:
    """Each user's `variant` adapter file in the run's node stores; a ValueError unless two users have one."""
    files = _adapter_files(Path(run_dir), variant)
    if len(files) < 2:
        raise ValueError(
            f"{run_dir}: need personal adapters of variant {variant!r} from at least two users, found {len(files)} "
            f"(looked for clients/<user>/adapters/{personal_adapter_name('<user>', variant)}/{ADAPTER_FILE})"
        )
    return files


def adapter_similarity(run_dir: Path, variant: str = "k0") -> dict[str, Any]:
    """Pairwise similarity of the users' personal `variant` adapters, with a summary over distinct pairs."""
    files = similarity_inputs(run_dir, variant)
    users = list(files)
    matrix = _mean_tensor_cosine([load_file(path) for path in files.values()], users)
    pairs = matrix[torch.triu_indices(len(users), len(users), offset=1).unbind()]
    return {
        "variant": variant,
        "users": users,
        "matrix": matrix.tolist(),
        "summary": {
            "mean_off_diagonal": pairs.mean().item(),
            "std": pairs.std(unbiased=False).item(),  # over the distinct pairs
            "min": pairs.min().item(),
            "max": pairs.max().item(),
            "n_users": len(users),
        },
    }


def _markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    return (
        f"# Personal adapter similarity (variant {result['variant']})\n\n"
        "Cosine similarity between two users' adapters: each tensor flattened, cosine per tensor, averaged over "
        "tensors (OPPU appendix G). Statistics over distinct user pairs.\n\n"
        "| users | mean | std | min | max |\n|---:|---:|---:|---:|---:|\n"
        f"| {s['n_users']} | {s['mean_off_diagonal']:.4f} | {s['std']:.4f} | {s['min']:.4f} | {s['max']:.4f} |\n"
    )


def _heatmap_png(result: dict[str, Any]) -> bytes:
    import matplotlib  # here, where the headless backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = result["users"]
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(result["matrix"], cmap="coolwarm", vmin=-1.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="cosine similarity")
    if len(users) <= 30:  # beyond that the names are unreadable
        ax.set_xticks(range(len(users)), users, rotation=90, fontsize=7)
        ax.set_yticks(range(len(users)), users, fontsize=7)
    ax.set_title(f"personal adapters ({result['variant']}), {len(users)} users")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_similarity(run_dir: Path, out_dir: Path, variant: str = "k0") -> dict[str, Any]:
    """adapter_similarity written as similarity.json, similarity.md (summary table) and similarity.png (heatmap)."""
    result = adapter_similarity(run_dir, variant)
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "similarity.json", result)
    atomic_write_text(out_dir / "similarity.md", _markdown(result))
    atomic_write_bytes(out_dir / "similarity.png", _heatmap_png(result))
    return result
