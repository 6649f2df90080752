"""SFT data preparation on an UltraChat-shaped synthetic set: speed, memory, cache, once per job.

    python bench/data_prep.py --rows 5000                     # the table below, on this machine
    python bench/data_prep.py --rows 200000 --skip-uncached-1proc --skip-torchrun

Writes a multi-turn `messages` .jsonl (1-5 exchanges, user turns of tens of words, replies of
hundreds; its size is --rows), then measures, each in a fresh process:

  floor      one batched call of the fast tokenizer on the same text (every message, joined)
  prepare    `prepare_sft_data` with data.num_proc 1 and 2 on an empty cache: rows/s, tokens/s,
             peak RSS of the process (and of its largest worker)
  cached     the same call again on the filled cache (a second launch)
  torchrun   `torchrun --nproc_per_node 2`: how many rows each rank tokenized (encode_chat calls)

Run against another checkout (e.g. main, for a before/after table) with PYTHONPATH pointing at it:
options that checkout's DataConfig lacks (num_proc, cache_dir) are reported as n/a.
"""

import argparse
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there been one all we their has would when if will what more no out so can "
    "said who about people time how could first water than like been call who oil its now find long down "
    "day did get come made may part over new sound take only little work know place year live me back give "
    "most very after thing our just name good sentence man think say great where help through much before "
    "line right too mean old any same tell boy follow came want show also around form three small set put "
    "end does another well large must big even such because turn here why ask went men read need land "
    "different home us move try kind hand picture again change off play spell air away animal house point "
    "page letter mother answer found study still learn should America world high every near add food "
    "between own below country plant last school father keep tree never start city earth eye light thought"
).split()


def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + rng.choice((".", ".", "?", "!"))


def paragraph(rng: random.Random, words: int) -> str:
    out, left = [], words
    while left > 0:
        n = min(left, rng.randint(8, 24))
        out.append(sentence(rng, n))
        left -= n
    return " ".join(out)


def make_rows(count: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(count):
        messages = []
        for _ in range(rng.randint(1, 5)):
            messages.append({"role": "user", "content": paragraph(rng, rng.randint(15, 60))})
            messages.append({"role": "assistant", "content": paragraph(rng, rng.randint(80, 260))})
        yield {"prompt_id": f"{rng.getrandbits(64):016x}", "messages": messages}


def make_preference_rows(count: int, seed: int = 0):
    """UltraFeedback-shaped: a prompt, and chosen/rejected conversations that repeat it."""
    rng = random.Random(seed)
    for _ in range(count):
        prompt = {"role": "user", "content": paragraph(rng, rng.randint(20, 120))}
        answers = [{"role": "assistant", "content": paragraph(rng, rng.randint(60, 300))} for _ in range(2)]
        yield {"prompt": prompt["content"], "chosen": [prompt, answers[0]], "rejected": [prompt, answers[1]]}


def write_set(path: Path, rows: int, kind: str = "sft") -> None:
    make = make_rows if kind == "sft" else make_preference_rows
    with path.open("w") as handle:
        for row in make(rows):
            handle.write(json.dumps(row) + "\n")


def row_texts(row: dict) -> list[str]:
    """The text a row's preparation tokenizes: the conversation (SFT), both conversations (DPO)."""
    if "messages" in row:
        return [" ".join(m["content"] for m in row["messages"])]
    return [" ".join(m["content"] for m in row[key]) for key in ("chosen", "rejected")]


def peak_rss_mb() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own), "largest_worker_rss_mb": round(children)}


def data_config(path: Path, procs: int, cache: Path, max_length: int, kind: str = "sft"):
    from omegaconf import OmegaConf

    from mixtral_tune.config import DataConfig

    fields = DataConfig.__dataclass_fields__
    extra = {}
    if "num_proc" in fields:
        extra["num_proc"] = procs
    elif procs != 1:
        return None
    if "cache_dir" in fields:
        extra["cache_dir"] = str(cache)
    return OmegaConf.structured(DataConfig(path=str(path), kind=kind, max_length=max_length, **extra))


def measure_floor(path: Path, rows: int) -> dict:
    """The first `rows` rows (the floor's rate does not depend on the size; its memory does)."""
    from mixtral_model import load_tokenizer

    tokenizer = load_tokenizer()
    with path.open() as handle:
        lines = [line for _, line in zip(range(rows), handle, strict=False)]
    texts = [text for line in lines for text in row_texts(json.loads(line))]
    start = time.perf_counter()
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    seconds = time.perf_counter() - start
    tokens = sum(len(row) for row in ids)
    return {"seconds": seconds, "rows": len(lines), "tokens": tokens, **peak_rss_mb()}


def measure_prepare(path: Path, procs: int, cache: Path, max_length: int, kind: str) -> dict:
    from mixtral_model import load_tokenizer
    from mixtral_tune.data import prepare_dpo_data, prepare_sft_data

    tokenizer = load_tokenizer()
    cfg = data_config(path, procs, cache, max_length, kind)
    if cfg is None:
        return {"skipped": f"this checkout has no data.num_proc (asked for {procs})"}
    start = time.perf_counter()
    prepared = (prepare_sft_data if kind == "sft" else prepare_dpo_data)(cfg, tokenizer, seed=0)
    seconds = time.perf_counter() - start
    if kind == "dpo":
        return {"seconds": seconds, "rows": len(prepared.train), "tokens": 0, **peak_rss_mb()}
    lengths = prepared.train.with_format("arrow")["input_ids"]
    import pyarrow.compute as pc

    tokens = int(pc.sum(pc.list_value_length(lengths)).as_py())
    return {"seconds": seconds, "rows": len(prepared.train), "tokens": tokens, **peak_rss_mb()}


def measure_torchrun(path: Path, cache: Path, max_length: int, out: Path) -> None:
    """One rank of `torchrun --nproc_per_node 2`: count the rows this rank tokenized."""
    import mixtral_tune.data as data
    from mixtral_model import load_tokenizer

    calls = 0
    encode_chat = data.encode_chat

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return encode_chat(*args, **kwargs)

    data.encode_chat = counting
    cfg = data_config(path, 1, cache, max_length)
    start = time.perf_counter()
    prepared = data.prepare_sft_data(cfg, load_tokenizer(), seed=0)
    rank = os.environ.get("RANK", "0")
    result = {"rank": rank, "encode_chat_calls": calls, "rows": len(prepared.train),
              "seconds": time.perf_counter() - start}  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def child(
    mode: str, path: Path, procs: int, cache: Path, max_length: int, count: int = 0, kind="sft"
) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--data", str(path), "--procs", str(procs),
               "--cache", str(cache), "--max-length", str(max_length), "--count", str(count), "--kind", kind]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true" if mode == "floor" else "false"}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    measured["process_seconds"] = time.perf_counter() - start
    return measured


def torchrun(path: Path, cache: Path, max_length: int, out: Path) -> list[dict]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={port}",
               __file__, "--child", "torchrun", "--data", str(path), "--cache", str(cache),
               "--max-length", str(max_length), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"torchrun failed:\n{result.stderr[-3000:]}")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def measure_dpo(workdir: Path, rows: int, max_length: int) -> dict:
    path = workdir / f"ultrafeedback_like_{rows}.jsonl"
    if not path.exists():
        write_set(path, rows, "dpo")
    floor = child("floor", path, 1, workdir, max_length, count=rows, kind="dpo")
    results = {"floor": floor}
    for procs in (1, 2):
        cache = workdir / f"cache_dpo_{procs}"
        shutil.rmtree(cache, ignore_errors=True)
        measured = child("prepare", path, procs, cache, max_length, kind="dpo")
        results[f"prepare_{procs}proc"] = measured
        if "skipped" in measured:
            continue
        ratio = (measured["rows"] / measured["seconds"]) / (floor["rows"] / floor["seconds"])
        print(f"DPO prepare, {procs} proc: {measured['rows'] / measured['seconds']:,.0f} rows/s "
              f"({ratio:.0%} of the floor of both conversations: {floor['rows'] / floor['seconds']:,.0f} rows/s, "
              f"{floor['tokens'] / floor['rows']:.0f} tokens a row)", flush=True)  # fmt: skip
    return results


def rate(measured: dict) -> str:
    if "skipped" in measured:
        return "n/a"
    return f"{measured['rows'] / measured['seconds']:,.0f} rows/s, {measured['tokens'] / measured['seconds']:,.0f} tok/s"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the set and caches here")
    parser.add_argument("--out", type=Path, default=None, help="write the measurements as JSON here")
    parser.add_argument(
        "--floor-rows", type=int, default=20000, help="rows the floor is measured on (at most)"
    )
    parser.add_argument("--skip-torchrun", action="store_true")
    parser.add_argument("--skip-uncached-1proc", action="store_true")
    parser.add_argument("--child", choices=("floor", "prepare", "torchrun"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--procs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="sft", help=argparse.SUPPRESS)
    parser.add_argument("--dpo-rows", type=int, default=0, help="also time DPO preparation on this many rows")
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # PYTHONPATH (another checkout) wins

    if args.child == "floor":
        print(json.dumps(measure_floor(args.data, args.count)))
        return
    if args.child == "prepare":
        print(json.dumps(measure_prepare(args.data, args.procs, args.cache, args.max_length, args.kind)))
        return
    if args.child == "torchrun":
        measure_torchrun(args.data, args.cache, args.max_length, args.out)
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="data_prep_"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"ultrachat_like_{args.rows}.jsonl"
    if not path.exists():
        write_set(path, args.rows)
    raw_mb = path.stat().st_size / 2**20
    print(f"set: {path} ({args.rows} rows, {raw_mb:.0f} MB); load average {os.getloadavg()}", flush=True)

    results = {"rows": args.rows, "raw_mb": round(raw_mb), "load_average_start": os.getloadavg()}
    floor_rows = min(args.rows, args.floor_rows)
    for procs in (1, 2):
        if procs == 1 and args.skip_uncached_1proc:
            continue
        # The machine is shared: the floor is measured right before each preparation it is compared with.
        floor = results[f"floor_{procs}proc"] = child(
            "floor", path, 1, workdir, args.max_length, count=floor_rows
        )
        print(f"floor (one batched fast-tokenizer call): {rate(floor)}", flush=True)
        cache = workdir / f"cache_{procs}"
        shutil.rmtree(cache, ignore_errors=True)
        measured = child("prepare", path, procs, cache, args.max_length)
        results[f"prepare_{procs}proc"] = measured
        if "skipped" in measured:
            print(f"prepare, {procs} proc: n/a", flush=True)
            continue
        ratio = (measured["rows"] / measured["seconds"]) / (floor["rows"] / floor["seconds"])
        print(f"prepare, {procs} proc: {rate(measured)} ({ratio:.0%} of the floor), {measured['seconds']:.1f} s, "
              f"peak RSS {measured['peak_rss_mb']} MB (largest worker {measured['largest_worker_rss_mb']} MB)",
              flush=True)  # fmt: skip
        cached = child("prepare", path, procs, cache, args.max_length)
        results[f"cached_{procs}proc"] = cached
        print(f"  second launch: prepare {cached['seconds']:.2f} s, whole process {cached['process_seconds']:.1f} s, "
              f"peak RSS {cached['peak_rss_mb']} MB", flush=True)  # fmt: skip
    if not args.skip_torchrun:
        cache = workdir / "cache_torchrun"
        shutil.rmtree(cache, ignore_errors=True)
        ranks = torchrun(path, cache, args.max_length, workdir)
        results["torchrun"] = ranks
        calls = ", ".join(f"rank {r['rank']}: {r['encode_chat_calls']}" for r in ranks)
        print(f"torchrun --nproc_per_node 2: encode_chat calls {calls} (rows {args.rows})", flush=True)
    if args.dpo_rows:
        results["dpo"] = measure_dpo(workdir, args.dpo_rows, args.max_length)
    results["load_average_end"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
