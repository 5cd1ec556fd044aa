"""npm-hf packaging. The root folders modeling/, trainer/ and hub_cards/ install as npm_hf.modeling,
npm_hf.trainer and npm_hf.hub_cards (never as top-level packages)."""

import re
from pathlib import Path

from setuptools import find_packages, setup


ROOT = Path(__file__).parent
MAPPED_ROOTS = ("modeling", "trainer", "hub_cards")
nested = find_packages(include=[f"{root}*" for root in MAPPED_ROOTS])
version = re.search(r'__version__ = "([^"]+)"', (ROOT / "npm_hf" / "version.py").read_text()).group(1)

setup(
    name="npm-hf",
    version=version,
    description="Nonparametric Masked Language Models (NPM) as a Hugging Face transformers plugin",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=[*find_packages(include=["npm_hf", "npm_hf.*"]), *(f"npm_hf.{name}" for name in nested)],
    package_dir={"npm_hf": "npm_hf", **{f"npm_hf.{root}": root for root in MAPPED_ROOTS}},
    package_data={"npm_hf.hub_cards": ["*.md", "*.jinja"]},
    install_requires=[
        "torch>=2.6",
        "transformers>=5.24,<6",
        "huggingface-hub>=1.31,<3",
        "tokenizers>=0.22",
        "safetensors",
        "numpy>=1.26",
        "faiss-cpu>=1.8",
        "datasets>=3",
        "accelerate>=1.1",
        "evaluate>=0.4",
        "tqdm",
        "bm25s>=0.2",  # the BM25 passage pre-filter (pure Python + NumPy)
    ],
    extras_require={
        "train": ["peft>=0.13"],  # LoRA and other adapters on the encoder (docs/training.md)
        "demo": ["gensim>=4.3"],  # ships the Wikipedia sample the demo indexes by default
        "qdrant": ["qdrant-client>=1.20"],  # npm_hf.vector_store: candidate search in a Qdrant collection
        "gradio": ["gradio>=6"],  # npm-hf gradio / spaces/npm-demo/app.py (npm_hf.web_demo; launch(css=) is Gradio 6)
        "ray": ["ray>=2.40"],  # npm_hf.serve: index shards served by Ray actors (docs/scale_out.md)
        "dev": ["pytest>=8", "gensim>=4.3", "qdrant-client>=1.20", "peft>=0.13", "gradio>=6", "websocket-client>=1.6",
                "ray>=2.40", "matplotlib>=3.8"],  # matplotlib: the benchmark figures in docs/
    },
    entry_points={"console_scripts": ["npm-hf=npm_hf.cli:main"]},
)
