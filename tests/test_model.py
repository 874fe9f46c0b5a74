"""The base model: a deterministic tiny model, its content hash and the checks built on it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from client import device
from client.device import BF16_MIN_SPEEDUP, cpu_bf16_speedup, pick_dtype, resolve_dtype
from client.item_statistics import contribution
from client.memory import _libc
from client.model_build import resolve_model
from client.model_cache import default_cache_dir, find_model_by_hash, model_slug
from client.model_loading import load_base
from client.model_transfer import receive_model_chunk
from client.partition import load_users, split_users
from common.config import RunConfig, UserCounts
from common.model_files import MANIFEST, model_hash, verify_model_dir
from common.secure_update import on_quantization_grid
from common.tasks import get_task
from server.distribution import model_chunks
from simulation.node_stores import write_partitions

REPO = Path(__file__).resolve().parents[1]


def test_resolve_model_is_cached_and_stable(tiny_model_dir):
    again = resolve_model("tiny-random")
    assert again == tiny_model_dir
    assert model_hash(again) == model_hash(tiny_model_dir)
    manifest = json.loads((tiny_model_dir / MANIFEST).read_text())
    assert manifest["name"] == "tiny-random"
    assert len(manifest["sha256"]) == 64
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tiny_model_dir / name).is_file(), name


def test_tiny_model_rebuilds_bit_for_bit(tiny_model_dir, tmp_path):
    """Building the tiny model again from scratch (another cache) gives the same files, so the same hash."""
    tokenizers = default_cache_dir() / "tokenizers"
    if tokenizers.is_dir():  # reuse the converted tokenizer instead of reading the GGUF again
        shutil.copytree(tokenizers, tmp_path / "tokenizers")
    rebuilt = resolve_model("tiny-random", cache_dir=tmp_path)
    assert rebuilt == tmp_path / "models" / "tiny-random"
    assert model_hash(rebuilt) == model_hash(tiny_model_dir)
    assert (rebuilt / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model-")], "staging directory left behind"


def test_a_local_model_directory_is_copied_not_loaded(tiny_model_dir, tmp_path):
    """A user's own model (sharded, with stray files beside it, as a hub download has) enters the cache as its
    config, weights and tokenizer, byte for byte: nothing holds the base in memory (an 8B one: 17 GB), its shards stay
    shards, and the same model loads from it."""
    source = tmp_path / "my-model"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(source, max_shard_size="4MB")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(source)
    (source / "original").mkdir()
    (source / "original" / "consolidated.00.pth").write_bytes(b"a second copy of the weights")
    (source / "training_args.bin").write_bytes(b"state of another job")
    shards = sorted(p.name for p in source.glob("model-*.safetensors"))
    assert len(shards) >= 2

    cached = resolve_model(str(source), tmp_path / "cache")
    assert sorted(p.name for p in cached.iterdir()) == sorted(
        {*shards, "model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
         "tokenizer_config.json", "chat_template.jinja", MANIFEST})
    assert all((cached / s).read_bytes() == (source / s).read_bytes() for s in shards)
    assert verify_model_dir(cached) == model_hash(cached)
    tokens = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        logits = [load_base(d, "cpu", "float32")[0](tokens).logits for d in (cached, tiny_model_dir)]
    assert torch.equal(*logits)


def test_a_local_model_without_safetensors_is_loaded_and_saved(tiny_model_dir, tmp_path):
    """Weights in another format (here PyTorch's pickle) go through transformers, which writes safetensors."""
    source = tmp_path / "my-model"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(source)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(source)
    state = load_file(source / "model.safetensors")
    torch.save(state, source / "pytorch_model.bin")
    (source / "model.safetensors").unlink()
    cached = resolve_model(str(source), tmp_path / "cache")
    assert (cached / "model.safetensors").is_file() and not (cached / "pytorch_model.bin").exists()
    assert load_file(cached / "model.safetensors").keys() == state.keys()


def test_verify_model_dir_returns_manifest_hash(tiny_model_dir):
    assert verify_model_dir(tiny_model_dir) == model_hash(tiny_model_dir)


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert verify_model_dir(copy) == model_hash(model_dir)  # an untouched copy verifies
    return copy


def test_verify_model_dir_detects_a_flipped_byte(tiny_model_dir, tmp_path):
    copy = _copy(tiny_model_dir, tmp_path)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match the manifest"):
        verify_model_dir(copy)
    assert model_hash(copy) == model_hash(tiny_model_dir)  # the recorded hash itself is untouched


def test_verify_model_dir_detects_added_and_removed_files(tiny_model_dir, tmp_path):
    copy = _copy(tiny_model_dir, tmp_path)
    (copy / "extra.txt").write_text("not part of the model")
    with pytest.raises(ValueError, match=f"{copy}: files do not match the manifest hash"):
        verify_model_dir(copy)
    (copy / "extra.txt").unlink()
    (copy / "generation_config.json").unlink()
    with pytest.raises(ValueError, match=f"{copy}: files do not match the manifest hash"):
        verify_model_dir(copy)


def test_the_bf16_speedup_is_measured_once_per_process():
    speedup = cpu_bf16_speedup()
    assert speedup > 0
    assert cpu_bf16_speedup() == speedup


def test_the_bf16_speedup_measurement_gives_the_process_its_thread_count_back():
    """It measures at one thread (a preempted thread of several swung the ratio by orders of magnitude, so processes
    of one run picked different dtypes), then the process computes at its own count again."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert device.cpu_bf16_speedup.__wrapped__(repeats=1) > 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("machine", "speedup", "dtype"), [
    ("AVX2-only Zen 3", 0.01, torch.float32), ("Intel AVX512-bf16 without AMX", 0.5, torch.float32),
    ("just below the bar", BF16_MIN_SPEEDUP - 0.01, torch.float32), ("at the bar", BF16_MIN_SPEEDUP, torch.bfloat16),
    ("Zen 5", 4.4, torch.bfloat16)])
def test_pick_dtype_follows_the_measured_cpu_speed(monkeypatch, machine, speedup, dtype):
    """bf16 only where the measured bf16 matmul beats fp32 clearly (flags alone mislead: see pick_dtype); the
    speedups are those measured on the machines named (docs/benchmarks.md)."""
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: speedup)
    assert pick_dtype(torch.device("cpu")) == dtype


KERNELS_KEPT = """
import sys
if sys.argv[1] == "client":
    import client.device  # noqa: F401
import psutil
import torch
from client.memory import return_freed_memory
torch.set_num_threads(1)
def rss():
    return_freed_memory()
    return psutil.Process().memory_info().rss
weight = torch.randn(576, 1536, dtype=torch.bfloat16)
def products(rows):
    for m in rows:
        torch.randn(m, 576, dtype=torch.bfloat16) @ weight
products(range(8, 136))  # more shapes than the bound: whatever the caches keep, they hold now
start = rss()
products(range(136, 264))
print((rss() - start) / 2**20)
"""


@pytest.mark.skipif(_libc() is None, reason="not glibc: freed heap cannot be handed back, so RSS would not tell")
def test_a_client_process_keeps_a_bounded_number_of_bf16_matmul_kernels():
    """oneDNN keeps the kernels it built for each product shape (about 0.6 MB each here); batches as wide as their
    longest row bring a few dozen shapes a run, so a client process caps the caches (client.device)."""
    if pick_dtype(torch.device("cpu")) != torch.bfloat16:
        pytest.skip("this CPU computes in fp32, whose products keep no per-shape kernels")

    def growth_mib(process: str, env: dict[str, str]) -> float:
        done = subprocess.run([sys.executable, "-c", KERNELS_KEPT, process], capture_output=True, text=True,
                              timeout=300, cwd=REPO, env=env)
        assert done.returncode == 0, done.stderr
        return float(done.stdout)

    env = {k: v for k, v in os.environ.items() if k not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    env["PYTHONPATH"] = str(REPO)
    unbounded = growth_mib("plain", env)  # torch's defaults: 1024 kernels in each cache
    if unbounded < 32:
        pytest.skip(f"this CPU's bf16 products keep little per shape ({unbounded:.0f} MiB for 128 shapes)")
    bounded = growth_mib("client", env)
    assert bounded < 8, f"128 new shapes grew a client process {bounded:.0f} MiB (a plain one {unbounded:.0f} MiB)"


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == str(pick_dtype(torch.device("cpu"))).removeprefix("torch.")
    assert resolve_dtype("float32", "cpu") == "float32"
    with pytest.raises(ValueError, match="float16"):
        resolve_dtype("float16", "cpu")


def test_bf16_on_cpu_uses_eager_attention_and_matches_fp32(tiny_model_dir):
    """Eager attention for bf16 CPU (faster backward); its logits stay close to the fp32 sdpa model's."""
    bf16, _ = load_base(tiny_model_dir, "cpu", "bfloat16")
    fp32, _ = load_base(tiny_model_dir, "cpu", "float32")
    assert bf16.config._attn_implementation == "eager" and fp32.config._attn_implementation == "sdpa"
    ids = torch.tensor([[1, 504, 2378, 314, 9023, 28, 1030, 44]])
    with torch.no_grad():
        low, high = bf16(input_ids=ids).logits.float(), fp32(input_ids=ids).logits
    assert (low.softmax(-1) - high.softmax(-1)).abs().max() < 0.02


def test_load_base_uses_picked_dtype_and_is_shared(tiny_model_dir, tiny):
    model, tokenizer = tiny
    assert model.dtype == pick_dtype(torch.device("cpu"))
    assert load_base(tiny_model_dir, "cpu")[0] is model  # one copy per process
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token_id is not None
    picked = str(model.dtype).removeprefix("torch.")
    assert load_base(tiny_model_dir, "cpu", picked)[0] is model  # "auto" and its resolution share one copy
    other = "bfloat16" if picked == "float32" else "float32"
    copy, _ = load_base(tiny_model_dir, "cpu", other)
    assert copy.dtype == getattr(torch, other) and copy is not model


@pytest.mark.parametrize(
    "name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "org/name", "/abs/path/to/model/", "tiny-random"]
)
def test_model_slug_is_one_path_component(name):
    slug = model_slug(name)
    assert "/" not in slug and slug
    assert Path(slug).name == slug
    assert model_slug(name) == slug


def test_model_slug_keeps_simple_names_and_separates_hub_ids():
    assert model_slug("tiny-random") == "tiny-random"
    assert model_slug("smollm2") == "smollm2"
    assert model_slug("org/name") != model_slug("org/other")
    assert model_slug("org/name") != model_slug("orgname")


# ------------------------------------------------------------------------------- transfer from the server


def _chunks(model_dir: Path, size: int = 1 << 16) -> list[list]:
    """The server's chunks of a model, as lists a test may alter."""
    return [list(chunk) for chunk in model_chunks(model_dir, size)]


def test_the_server_reads_the_model_one_chunk_at_a_time(tmp_path):
    """Sending a model costs the server one chunk of memory, not the model's size (an 8B base: 16 GB)."""
    (tmp_path / "model.safetensors").write_bytes(os.urandom(8 << 20))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "empty.txt").write_bytes(b"")
    tracemalloc.start()
    chunks = [(file, offset, len(data), last) for file, offset, data, _, _, last in model_chunks(tmp_path, 1 << 20)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 << 20, peak
    assert chunks[:2] == [("config.json", 0, 2, False), ("empty.txt", 0, 0, False)]
    assert chunks[2:] == [("model.safetensors", i << 20, 1 << 20, i == 7) for i in range(8)]


def test_find_model_by_hash(tiny_model_dir, tmp_path):
    found = find_model_by_hash(model_hash(tiny_model_dir))  # may be a copy installed from a server
    assert found is not None and model_hash(found) == model_hash(tiny_model_dir)
    assert find_model_by_hash("0" * 64) is None
    assert find_model_by_hash(model_hash(tiny_model_dir), cache_dir=tmp_path) is None  # empty cache


def test_received_model_is_installed_and_verified(tiny_model_dir, tmp_path):
    sha = model_hash(tiny_model_dir)
    chunks = _chunks(tiny_model_dir)
    assert len(chunks) > len(list(tiny_model_dir.iterdir()))  # the weights really come in several chunks
    installed = [receive_model_chunk(sha, "tiny-random", *chunk, cache_dir=tmp_path) for chunk in chunks]
    assert installed == [False] * (len(chunks) - 1) + [True]
    model_dir = find_model_by_hash(sha, cache_dir=tmp_path)
    assert model_dir is not None and model_dir.parent == tmp_path / "models"
    assert verify_model_dir(model_dir) == sha
    assert (model_dir / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()


def test_corrupted_chunk_is_refused(tiny_model_dir, tmp_path):
    sha = model_hash(tiny_model_dir)
    chunks = _chunks(tiny_model_dir)
    index = next(i for i, c in enumerate(chunks) if c[0] == "model.safetensors")
    broken = bytearray(chunks[index][2])
    broken[7] ^= 0xFF
    chunks[index][2] = bytes(broken)
    with pytest.raises(ValueError, match="corrupted"):
        for chunk in chunks:
            receive_model_chunk(sha, "tiny-random", *chunk, cache_dir=tmp_path)
    assert find_model_by_hash(sha, cache_dir=tmp_path) is None


def test_model_with_another_hash_than_announced_is_refused(tiny_model_dir, tmp_path):
    chunks = _chunks(tiny_model_dir)
    with pytest.raises(ValueError, match="announced"):
        for chunk in chunks:
            receive_model_chunk("f" * 64, "tiny-random", *chunk, cache_dir=tmp_path)
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())


# what a fresh ClientApp process runs for an announce, each model chunk and the item-table round's collect stage (a
# SuperNode starts one per message)
HANDLERS_ALONE = """
import json, sys
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.common import parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import recorddict_to_fitres
from client.app import adapt_secure, announce, model_chunk
from common import protocol as p

test_dir, train_dir, cache, sha, chunks, run_config = sys.argv[1:5] + [json.loads(a) for a in sys.argv[5:]]

def send(handler, user_dir, kind, key, values):
    context = Context(run_id=1, node_id=1, node_config={"user-dir": user_dir, "model-cache": cache},
                      state=RecordDict(), run_config={})
    metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="", created_at=0.0, ttl=60.0, message_type=kind)
    return handler(Message(RecordDict({key: ConfigRecord(values)}), metadata=metadata), context).content

announced = {p.MODEL_NAME: "tiny-random", p.MODEL_SHA256: sha}
replies = [dict(send(announce, test_dir, p.ANNOUNCE, p.CONFIG, announced)[p.CONFIG])]
for file, offset, data_path, digest, size, last in chunks:
    replies.append(dict(send(model_chunk, test_dir, p.MODEL_CHUNK, p.CONFIG, {
        **announced, p.CHUNK_FILE: file, p.CHUNK_OFFSET: offset, p.CHUNK_DATA: Path(data_path).read_bytes(),
        p.CHUNK_FILE_SHA256: digest, p.CHUNK_FILE_SIZE: size, p.CHUNK_LAST: last})[p.CONFIG]))
replies.append(dict(send(announce, test_dir, p.ANNOUNCE, p.CONFIG, announced)[p.CONFIG]))
table = send(adapt_secure, train_dir, "train", p.FITINS_CONFIG,
             {**run_config, p.MODEL_SHA256: sha, p.SECURE_PAYLOAD: p.ITEM_TABLE, p.ROUND_CLIENTS: 1})
table = [a.tolist() for a in parameters_to_ndarrays(recorddict_to_fitres(table, keep_input=True).parameters)]
heavy = sorted(m for m in ("torch", "transformers", "peft", "rouge_score", "nltk", "scipy") if m in sys.modules)
print(json.dumps({"replies": replies, "item_table": table, "heavy": heavy}))
"""


def test_the_handlers_that_load_no_model_load_no_torch(tiny_model_dir, tmp_path):
    """The ClientApp's handlers themselves, in a fresh process as a SuperNode runs each message: the model arrives
    and is installed, a training user's item table is replied, and nothing loads torch, transformers, peft or
    rouge-score (seconds a message otherwise)."""
    cfg = RunConfig.from_record({"task": "MovieLens", "model": "tiny-random"})
    test, train = split_users(load_users(cfg, 2), UserCounts(1, 1), cfg)
    nodes = write_partitions(tmp_path / "run", test, train, {})
    test_dir, train_dir = (str(tmp_path / "run" / "clients" / node["user"]) for node in nodes)
    sha = model_hash(tiny_model_dir)
    chunks = []
    for i, (file, offset, data, digest, size, last) in enumerate(_chunks(tiny_model_dir, size=1 << 20)):
        (tmp_path / f"chunk-{i}").write_bytes(data)
        chunks.append([file, offset, str(tmp_path / f"chunk-{i}"), digest, size, last])
    done = subprocess.run(
        [sys.executable, "-c", HANDLERS_ALONE, test_dir, train_dir, str(tmp_path / "cache"), sha, json.dumps(chunks),
         json.dumps(cfg.to_record())],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    replies = result["replies"]
    assert replies[0] == {"role": "test", "has-model": False}
    assert [r["stored"] for r in replies[1:-1]] == [False] * (len(chunks) - 1) + [True]
    assert replies[-1] == {"role": "test", "has-model": True}  # installed, and found by its hash
    assert verify_model_dir(find_model_by_hash(sha, cache_dir=tmp_path / "cache")) == sha
    # the training user's item table, as the FitRes secaggplus_mod masks
    expected = on_quantization_grid(contribution(train[0], get_task(cfg.task)).vector(), 1)
    assert result["item_table"] == [a.tolist() for a in expected] and sum(expected[2]) > 0
    assert result["heavy"] == []


@pytest.mark.parametrize("name", ["../evil.py", "sub/config.json", MANIFEST])
def test_unsafe_file_names_from_the_server_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="refusing"):
        receive_model_chunk("a" * 64, "x", name, 0, b"{}", hashlib.sha256(b"{}").hexdigest(), 2, True,
                            cache_dir=tmp_path)
    assert not (tmp_path / "evil.py").exists()


def test_cuda_computes_attention_eagerly():
    """Fused SDPA gave NaN task-adapter updates on an H200 (left-padded rows attend to nothing): CUDA uses eager."""
    from client.device import attention_for

    assert attention_for(torch.device("cuda"), "bfloat16") == "eager"
    assert attention_for(torch.device("cuda"), "float32") == "eager"
    assert attention_for(torch.device("cpu"), "bfloat16") == "eager"
    assert attention_for(torch.device("cpu"), "float32") is None  # transformers: sdpa where the model has it
