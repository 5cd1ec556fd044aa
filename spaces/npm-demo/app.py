"""The npm-hf web demo as a Hugging Face Space (Gradio SDK).

A Space is a repository of its own: copy this folder into it, with an NPM directory (weights, tokenizer and
index/, as `npm-hf convert` + `build-index` or `npm-hf train` write it) in `model/` beside this file, or set the
Space variable NPM_MODEL to an NPM's Hub id. The demo itself lives in npm_hf.web_demo; `npm-hf gradio --model DIR`
serves the same page locally.
"""

import os
from pathlib import Path

from npm_hf.web_demo import WebDemoArguments, launch_demo


def demo_arguments() -> WebDemoArguments:
    """The Space's settings: NPM_MODEL (default: model/ beside this file), NPM_INDEX, and the address and port
    that the Spaces runtime sets (GRADIO_SERVER_NAME, GRADIO_SERVER_PORT)."""
    return WebDemoArguments(
        model=os.environ.get("NPM_MODEL", str(Path(__file__).resolve().parent / "model")),
        index=os.environ.get("NPM_INDEX") or None,
        host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
        port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )


if __name__ == "__main__":
    launch_demo(demo_arguments())
