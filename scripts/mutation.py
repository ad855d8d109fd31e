"""Mutation testing of the pure cores with mutmut, against their fast tests only.

    python -m pip install -e ".[test,dev]"
    python scripts/mutation.py [--jobs 2] [--out benchmarks/mutation.json]

mutmut writes its mutated copy (`mutants/`) beside the sources, so the run happens in a copy of the tree in a
temporary folder, removed after. Writes benchmarks/mutation.json: the tool and its version, per module and in
total the mutants killed, survived, timed out and skipped, the score ((killed + timed out) / (total - skipped)),
and every survivor with the reason it is equivalent (EQUIVALENT below). Exits 1 when a survivor has no reason or
the score is under 90%.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODULES = ["meshllm/wire/frames.py", "meshllm/wire/connection.py", "meshllm/collectives/star.py",
           "meshllm/cluster/plan.py", "meshllm/scheduler/window.py", "meshllm/generation/sampling.py",
           "meshllm/discovery/records.py"]
TESTS = ["tests/test_wire.py", "tests/test_star.py", "tests/test_plan.py", "tests/test_window.py",
         "tests/test_sampling.py", "tests/test_records.py",
         # the pure record tests that live beside the mDNS ones
         "tests/test_discovery.py::test_a_record_round_trips_through_its_txt_properties",
         "tests/test_discovery.py::test_garbage_records_are_rejected_with_the_reason",
         "tests/test_discovery.py::test_election_is_highest_score_then_smallest_node_id"]
MIN_SCORE = 0.90
WHY = ("mutmut, not cosmic-ray: mutmut forks every mutant from one process that has already imported torch, "
       "transformers and the tests, and runs only the tests that reach the mutated function, so the run takes "
       "minutes on 2 cores; cosmic-ray starts a new test process per mutant (about 6 s of imports here), over an "
       "hour for these modules.")

# Survivors that no test can kill: (module, function, original line, mutated line) -> why the mutant behaves as the
# original. Lines as `mutmut show` prints them, stripped.
_MSGPACK_DEFAULT = "msgpack>=1.0 (install_requires) has this as its default: the argument only says it out loud"
_SIZE = "b = DTYPE_SIZES.get(dtype, 4)"
_UNKNOWN_DTYPE = ("the fallback for a dtype name outside DTYPE_SIZES is never taken: every caller passes a compute "
                  "dtype name from resolve_dtype (float32, bfloat16, float16), all in DTYPE_SIZES")
_HELD = ("the room test is implied by the credit test: credit never goes below 0, so the bytes chosen never exceed "
         "share x bytes walked <= room; it only guards float drift, which stays far below one byte for integer sizes")
_TOP_P = ("top_p is at most 1 (SamplingParams.check); at 1 the filter drops only tokens whose cumulative mass is 0, "
          "which already have probability 0, so running it or not gives the same distribution")
_CLOSED = "unreachable for 'closed': receive_eof returns at its first line when the state is 'closed'"
EQUIVALENT: dict[tuple[str, str, str, str], str] = {
    ("wire/frames.py", "encode_body", "body = msgpack.packb(message, use_bin_type=True)",
     "body = msgpack.packb(message, )"): _MSGPACK_DEFAULT,
    ("wire/connection.py", "Connection.receive_eof", 'if self.state not in ("ready", "closed"):',
     'if self.state not in ("ready", "XXclosedXX"):'): _CLOSED,
    ("wire/connection.py", "Connection.receive_eof", 'if self.state not in ("ready", "closed"):',
     'if self.state not in ("ready", "CLOSED"):'): _CLOSED,
    ("cluster/plan.py", "_split",
     'raise PlanError(f"cannot give {n} devices at least {minimum} of {units} units each")', "raise PlanError(None)"):
        "unreachable: _split's one caller, make_plan, refuses more devices than heads before splitting heads with a "
        "minimum of one, and splits columns with a minimum of zero",
    ("cluster/plan.py", "_split", "low = {i for i in range(n) if i not in pinned and exact[i] < minimum}",
     "low = {i for i in range(n) if i not in pinned and exact[i] <= minimum}"):
        "a device whose exact quota equals the minimum gets the minimum either way: pinning it leaves every other "
        "quota unchanged (exact fractions), and unpinned its remainder is 0, never among the largest (checked on "
        "300,000 random splits)",
    ("cluster/plan.py", "block_bytes", _SIZE, "b = DTYPE_SIZES.get(dtype, None)"): _UNKNOWN_DTYPE,
    ("cluster/plan.py", "block_bytes", _SIZE, "b = DTYPE_SIZES.get(dtype, )"): _UNKNOWN_DTYPE,
    ("cluster/plan.py", "block_bytes", _SIZE, "b = DTYPE_SIZES.get(dtype, 5)"): _UNKNOWN_DTYPE,
    ("cluster/plan.py", "head_bytes", _SIZE, "b = DTYPE_SIZES.get(dtype, None)"): _UNKNOWN_DTYPE,
    ("cluster/plan.py", "head_bytes", _SIZE, "b = DTYPE_SIZES.get(dtype, )"): _UNKNOWN_DTYPE,
    ("cluster/plan.py", "head_bytes", _SIZE, "b = DTYPE_SIZES.get(dtype, 5)"): _UNKNOWN_DTYPE,
    ("cluster/plan.py", "local_memory_need",
     'plan = make_plan(config, [DeviceSpec(f"local-{i}", 1.0, budget) for i in range(n)], dtype)',
     'plan = make_plan(config, [DeviceSpec(f"local-{i}", 2.0, budget) for i in range(n)], dtype)'):
        "every local device gets the same weight, and only the ratios of weights matter to the split",
    ("scheduler/window.py", "spread", "if room <= 0 or not total:", "if room < 0 or not total:"):
        "with room 0, no block passes `held + size <= room`, since every block has a size above 0 (a block file "
        "has at least its header)",
    ("scheduler/window.py", "spread", "share = min(1.0, room / total)", "share = min(2.0, room / total)"):
        "a share above 1 (room above the total) still chooses every block, as a share of 1 does: each block's "
        "credit reaches its size and the room holds them all",
    ("scheduler/window.py", "spread", "if credit >= sizes[i] and held + sizes[i] <= room:",
     "if credit >= sizes[i] and held - sizes[i] <= room:"): _HELD,
    ("scheduler/window.py", "spread", "held += sizes[i]", "held = sizes[i]"): _HELD,
    ("scheduler/window.py", "spread", "held += sizes[i]", "held -= sizes[i]"): _HELD,
    ("scheduler/window.py", "Window.page_cached", "if room is None or room >= sum(self.sizes[i] for i in streamed):",
     "if room is None or room > sum(self.sizes[i] for i in streamed):"):
        "at room == the streamed bytes, spread over the streamed blocks has a share of 1 and returns them all, "
        "the same set as the early return",
    ("generation/sampling.py", "penalized",
     "return torch.where(seen[: scores.shape[0]], torch.where(scores < 0, scores * r, scores / r), scores)",
     "return torch.where(seen[: scores.shape[0]], torch.where(scores <= 0, scores * r, scores / r), scores)"):
        "at a score of 0, 0 * r == 0 / r == 0",
    ("generation/sampling.py", "next_token_probs", "if params.top_p < 1.0:", "if params.top_p <= 1.0:"): _TOP_P,
    ("generation/sampling.py", "next_token_probs", "if params.top_p < 1.0:", "if params.top_p < 2.0:"): _TOP_P,
    ("discovery/records.py", "_text", 'raw = raw.decode("ascii")', 'raw = raw.decode("ASCII")'):
        "codec names are case-insensitive",
    ("discovery/records.py", "decode",
     'budget_bytes=_int(props, "budget", required=False), addresses=tuple(addresses), port=port)',
     'budget_bytes=_int(props, "budget", required=None), addresses=tuple(addresses), port=port)'):
        "_text reads required as a flag: None is false, the same as False",
    ("discovery/records.py", "valid_node_id",
     'return bool(text) and all(c.isascii() and (c.isalnum() or c in "-_.") for c in text)',
     'return bool(text) and all(c.isascii() and (c.isalnum() or c in "XX-_.XX") for c in text)'):
        "the only character added is X, which isalnum() already accepts",
}


def mutmut_config() -> str:
    """The [tool.mutmut] table for the copy's pyproject.toml."""
    def toml_list(items: list[str]) -> str:
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    return (f"\n[tool.mutmut]\nsource_paths = [\"meshllm\"]\nonly_mutate = {toml_list(MODULES)}\n"
            f"pytest_add_cli_args_test_selection = {toml_list(TESTS)}\n"
            "pytest_add_cli_args = [\"-p\", \"no:cacheprovider\"]\n"
            # the copy is no git checkout; every run starts from nothing anyway
            "use_git_change_detection = false\n")


def copy_tree(dest: Path) -> None:
    """The package, its tests and the project files mutmut reads (no caches, no build output)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
    for name in ("meshllm", "tests"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy2(ROOT / name, dest / name)
    with open(dest / "pyproject.toml", "a") as f:
        f.write(mutmut_config())


def run_mutmut(tree: Path, jobs: int, log: Path) -> None:
    """`mutmut run` in `tree`, its output to `log` (a progress line per mutant)."""
    env = {k: v for k, v in os.environ.items() if k != "COVERAGE_PROCESS_START"}
    # one thread per worker: the machine is shared, and `jobs` workers already use `jobs` cores
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    # `python -m mutmut` would import mutmut's __main__ twice; call its command group the way its script does
    cmd = [sys.executable, "-c", "import sys; from mutmut.__main__ import cli; sys.argv[0] = 'mutmut'; cli()",
           "run", "--max-children", str(jobs)]
    with open(log, "w") as out:
        done = subprocess.run(cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.stdout.write(log.read_text(errors="replace")[-4000:] + "\n")
        raise SystemExit(f"mutmut run failed with exit status {done.returncode} (log above)")


def function_of(mutant: str) -> str:
    """'meshllm.wire.connection.xǁConnectionǁ_proof__mutmut_1' -> 'Connection._proof'."""
    name = mutant.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[1]
    name = name[2:] if name.startswith("x_") else name[1:]
    return ".".join(part for part in name.split("ǁ") if part)


def changed_lines(diff: str) -> tuple[str, str]:
    """The original and the mutated lines of a mutant's diff, each stripped and joined by newlines."""
    body = [line for line in diff.splitlines() if line[:3] not in ("---", "+++", "@@ ")]
    old = "\n".join(line[1:].strip() for line in body if line.startswith("-"))
    new = "\n".join(line[1:].strip() for line in body if line.startswith("+"))
    return old, new


def not_mutated() -> list[dict[str, str]]:
    """Functions mutmut leaves alone: decorated ones (bar staticmethod / classmethod), e.g. properties."""
    out = []
    for module in MODULES:
        tree = ast.parse((ROOT / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef | ast.Module):
                for child in node.body:
                    if isinstance(child, ast.FunctionDef) and child.decorator_list and not (
                            len(child.decorator_list) == 1 and isinstance(child.decorator_list[0], ast.Name)
                            and child.decorator_list[0].id in ("staticmethod", "classmethod")):
                        owner = f"{node.name}." if isinstance(node, ast.ClassDef) else ""
                        decorators = ", ".join(ast.unparse(d) for d in child.decorator_list)
                        out.append({"module": module, "function": owner + child.name, "decorators": decorators})
    return out


def collect(tree: Path) -> tuple[dict[str, Counter], list[dict[str, str]]]:
    """Per module, the count of each outcome; and every mutant not killed, with its diff."""
    cwd = os.getcwd()
    os.chdir(tree)  # mutmut's helpers read mutants/ and the config from the current folder
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant
        from mutmut.stats import status_by_exit_code

        outcomes = {"killed": "killed", "timeout": "timed_out", "survived": "survived", "no tests": "no_tests",
                    "skipped": "skipped"}
        counts: dict[str, Counter] = {}
        left: list[dict[str, str]] = []
        for module in MODULES:
            meta = json.loads((tree / "mutants" / (module + ".meta")).read_text())
            counts[module] = Counter()
            for mutant, code in sorted(meta["exit_code_by_key"].items(),
                                       key=lambda kv: (kv[0].rsplit("__mutmut_", 1)[0], int(kv[0].rsplit("_", 1)[1]))):
                outcome = outcomes.get(status_by_exit_code[code], "other")
                counts[module][outcome] += 1
                if outcome in ("survived", "no_tests", "other"):
                    old, new = changed_lines(get_diff_for_mutant(mutant, path=module))
                    left.append({"module": module, "function": function_of(mutant), "mutant": mutant,
                                 "outcome": outcome, "original": old, "mutated": new})
        return counts, left
    finally:
        os.chdir(cwd)


def score(c: Counter) -> float:
    return round((c["killed"] + c["timed_out"]) / max(1, sum(c.values()) - c["skipped"]), 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2, help="mutants tested at once (at most 2: a shared 2-core machine)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "mutation.json")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (and mutmut's results) for a look")
    args = ap.parse_args()
    jobs = max(1, min(2, args.jobs))

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="meshllm-mutation-"))
    try:
        tree = tmp / "meshllm"
        tree.mkdir()
        copy_tree(tree)
        print(f"mutation: mutmut {version('mutmut')} over {len(MODULES)} modules in {tree} ({jobs} workers; a few "
              f"minutes)", flush=True)
        run_mutmut(tree, jobs, tmp / "mutmut.log")
        counts, left = collect(tree)
    finally:
        if args.keep:
            print(f"mutation: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = round(time.monotonic() - started)

    unexplained = []
    for s in left:
        s["reason"] = EQUIVALENT.get((s["module"].removeprefix("meshllm/"), s["function"], s["original"], s["mutated"]))
        if s["reason"] is None:
            unexplained.append(s)
    total = sum(counts.values(), Counter())
    fields = ("killed", "survived", "timed_out", "no_tests", "skipped", "other")
    report = {
        "tool": "mutmut", "version": version("mutmut"), "why": WHY,
        "command": "python scripts/mutation.py", "seconds": seconds, "workers": jobs, "tests": TESTS,
        "score_definition": "(killed + timed_out) / (total - skipped); survivors and no_tests count against it",
        "modules": {m: {**{f: c[f] for f in fields}, "total": sum(c.values()), "score": score(c)}
                    for m, c in counts.items()},
        "total": {**{f: total[f] for f in fields}, "total": sum(total.values()), "score": score(total)},
        "survivors": left,
        "not_mutated": {"why": "mutmut mutates the bodies of plain functions and methods only: not decorated ones "
                               "(bar staticmethod and classmethod) and not module-level code such as MESSAGE_TYPES; "
                               "mesh_id is checked against an independent PBKDF2 in tests/test_records.py instead",
                        "functions": not_mutated()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")

    for m, c in report["modules"].items():
        print(f"  {m:36} {c['killed'] + c['timed_out']:4}/{c['total']:<4} killed  {c['score']:.1%}")
    print(f"mutation: score {report['total']['score']:.1%} ({total['killed']} killed, {total['timed_out']} timed out, "
          f"{len(left)} left, of {sum(total.values())}) in {seconds} s; wrote {args.out}")
    for s in unexplained:
        print(f"  unexplained {s['outcome']}: {s['mutant']}\n      - {s['original']}\n      + {s['mutated']}")
    if unexplained:
        print(f"mutation: {len(unexplained)} survivors without a reason: kill them with a test, or add them to "
              f"EQUIVALENT in scripts/mutation.py with why they are equivalent")
    if report["total"]["score"] < MIN_SCORE:
        print(f"mutation: the score is under {MIN_SCORE:.0%}")
    return 1 if unexplained or report["total"]["score"] < MIN_SCORE else 0


if __name__ == "__main__":
    sys.exit(main())
