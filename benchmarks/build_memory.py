"""Child process of figure M (benchmarks/run.py): one NPMIndex.build under --max-memory in a process of its own,
so that its peak resident memory (VmHWM) is the build's and nothing else's.

    python benchmarks/build_memory.py MODEL_DIR CORPUS.jsonl OUTPUT_DIR MAX_MEMORY FAISS_FACTORY

Prints one JSON object: resident bytes after the imports, after loading the model, the peak (VmHWM, which also
counts pages of the memory-mapped vector files the build wrote and read back), the sampled peak of anonymous
memory (RssAnon every 5 ms: what cannot be paged out to a file), and the build's own memory plan.
"""

import json
import sys
import threading
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (RssAnon, VmHWM, ...), in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def anonymous_bytes() -> int:
    return status_bytes("RssAnon")


class AnonymousPeak(threading.Thread):
    """Samples RssAnon every 5 ms while running (a peak between samples can be missed)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = anonymous_bytes(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, anonymous_bytes())
            time.sleep(0.005)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, anonymous_bytes())


def main(model_dir: str, corpus: str, output: str, max_memory: str, factory: str) -> None:
    import importlib

    import torch
    import transformers

    import npm_hf
    from npm_hf.index.memory import TRAIN_BYTES_PER_DIM
    from npm_hf.index import (BuildMemoryPlan, IndexBuildArguments, NPMIndex,
                              process_resident_bytes)

    importlib.import_module("faiss")  # everything a build imports, so that "after imports" holds it
    transformers.utils.logging.set_verbosity_error()
    torch.set_grad_enabled(False)
    after_imports = process_resident_bytes()
    model, tokenizer = npm_hf.load_npm(model_dir)
    model.eval()
    after_model = process_resident_bytes()
    plans = []
    real_measure = BuildMemoryPlan.measure.__func__

    def measure(cls, *args, **kwargs):  # keep the build's plan for the report
        plans.append(real_measure(cls, *args, **kwargs))
        return plans[-1]

    BuildMemoryPlan.measure = classmethod(measure)
    args = IndexBuildArguments(block_size=256, batch_size=16, faiss_factory=factory, max_memory=max_memory,
                               show_progress_bar=False, overwrite=True)
    sampler = AnonymousPeak()
    sampler.start()
    started = time.perf_counter()
    index = NPMIndex.build(model, tokenizer, corpus, output, args)
    seconds = time.perf_counter() - started
    anonymous_peak = sampler.stop()
    plan = plans[0]
    print(json.dumps({
        "after_imports": after_imports, "after_model": after_model,
        # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child forked from a large benchmark
        # process would report the parent's size; VmHWM belongs to this process's own address space.
        "peak_rss": status_bytes("VmHWM"), "peak_anonymous": anonymous_peak,
        "budget": plan.budget, "plan": {"baseline": plan.baseline, "encoding": plan.encoding,
                                        "metadata": plan.metadata, "available_for_faiss": plan.available()},
        "train_sample_fits": plan.available() // (TRAIN_BYTES_PER_DIM * plan.hidden_size),
        "factory": index.manifest.faiss_factory, "num_indexed": index.num_indexed, "seconds": round(seconds, 1),
        "vectors_bytes": sum((Path(output) / s["file"]).stat().st_size for s in index.manifest.vector_shards),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:6])
