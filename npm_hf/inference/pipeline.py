"""`pipeline("fill-mask")` for NPM models: answers retrieved from the reference corpus, with evidence.

This is the entry point of the remote code every saved NPM carries (see `npm_hf.inference`); with npm_hf installed,
`npm_hf.fill_mask.FillMaskDispatcher` builds it for NPM models.
"""

import numpy as np
import torch
from transformers import Pipeline
from transformers.pipelines.base import PipelineException
from transformers.utils import logging

from .decoding import NPMDecodingConfig, as_decoding_config
from .prefilter import Prefilters
from .reader import NPMIndexReader
from .retrieval import Candidates, NPMPredictor


logger = logging.get_logger(__name__)

NPM_MODEL_TYPE = "npm"


class NonparametricFillMaskPipeline(Pipeline):
    """Fill-mask by nearest-phrase retrieval (NPM). Same output schema as `FillMaskPipeline`, plus `phrase` (the
    answer as written in the corpus) and `evidence` (`doc_id`, `title`, `text` (the passage of index block
    `block_id`), `start`/`end` of the phrase in `text`, and `doc_start`/`doc_end` of it in the whole document). In
    span mode `token` is the list of the phrase's token ids.

    Args:
        index (`NPMIndexReader`, *optional*): the reference-corpus index (an `npm_hf.NPMIndex` is one); by default
            the model's own (its directory's or Hub repo's `config.index_subfolder`, at the same commit as the
            weights, or `config.index_repo_id`).
        index_kwargs (`dict`, *optional*): Hub options for that download (`cache_dir`, `token`, `local_files_only`).
        decoding (`NPMDecodingConfig` or `dict`, *optional*): decoding settings of this pipeline, over the
            model's own (its decoding_config.json). Any `NPMDecodingConfig` field is also accepted as a keyword
            argument, here (`k=1024`, `prefilter="bm25"`, `nprobe=16`, ...) and per call (`fill(text, k=1024)`,
            or `fill(text, decoding=...)`): a call's settings apply to that call only, and two pipelines over one
            model never share theirs.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, model, tokenizer=None, index: NPMIndexReader | None = None, index_kwargs: dict | None = None,
                 decoding: NPMDecodingConfig | dict | None = None, **kwargs):
        # the settings calls start from: the model's own (decoding_config.json, or inline in an older config.json),
        # then `decoding`; constructor keyword arguments (k=..., prefilter=...) are applied on top by
        # _sanitize_parameters, as per-call ones are on top of those
        self._base_decoding = as_decoding_config(decoding, base=NPMDecodingConfig.for_model(model,
                                                                                             **(index_kwargs or {})))
        super().__init__(model, tokenizer=tokenizer, **kwargs)
        if self.tokenizer is None or self.tokenizer.mask_token_id is None:
            raise PipelineException("fill-mask", NPM_MODEL_TYPE, "The tokenizer does not define a `mask_token`.")
        if index is None:
            index = NPMIndexReader.for_model(self.model, **(index_kwargs or {}))
        index.check_compatible(self.model, self.tokenizer)
        if index.num_searchable == 0:
            logger.warning(f"The index at {index.path} holds no indexed token (were all its documents deleted?): "
                           "every call will raise an error. Add documents (`npm-hf index add`) or rebuild it.")
        # a knob that does not fit the index fails here, not per query
        index.check_search_parameters(self.decoding.nprobe, self.decoding.ef_search)
        self.index = index
        self.predictor = NPMPredictor(self.model.config, self.tokenizer, index, self.decoding)
        self.prefilters = Prefilters(index)

    @property
    def decoding(self) -> NPMDecodingConfig:
        """The decoding settings of calls that pass none (the model's, then the constructor's; while the constructor
        runs, the model's)."""
        return getattr(self, "_postprocess_params", {}).get("decoding", self._base_decoding)

    def _sanitize_parameters(self, top_k=None, targets=None, tokenizer_kwargs=None, decoding=None,
                             **decoding_kwargs):
        preprocess_params = {"tokenizer_kwargs": tokenizer_kwargs} if tokenizer_kwargs else {}
        postprocess_params = {}
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
                raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
            postprocess_params["top_k"] = top_k
        if decoding is not None or decoding_kwargs:
            # a call's settings go on top of the pipeline's (the constructor's, while it runs); nothing shared changes
            merged = as_decoding_config(decoding, base=self.decoding).update(**decoding_kwargs)
            if getattr(self, "index", None) is not None:  # the constructor's are checked once the index is open
                self.index.check_search_parameters(merged.nprobe, merged.ef_search)
            postprocess_params["decoding"] = merged
        if targets is not None:
            targets = [targets] if isinstance(targets, str) else list(targets)
            if not targets:
                raise ValueError("At least one target must be provided when passed.")
            empty = [t for t in targets if not isinstance(t, str) or not t.strip() or not self.tokenizer.tokenize(t)]
            if empty:
                raise ValueError(f"The targets {empty!r} are empty or not strings (they tokenize to nothing); "
                                 "pass the answer phrases to score, e.g. targets=['Paris', 'New York'].")
            postprocess_params["targets"] = targets
        return preprocess_params, {}, postprocess_params

    # -------------------------------------------------------------------------------------------- preprocess
    def preprocess(self, inputs, tokenizer_kwargs=None):
        if not isinstance(inputs, str):
            raise ValueError(f"fill-mask takes a text (str) or a list of texts with a {self.tokenizer.mask_token}, "
                             f"got {type(inputs).__name__} {inputs!r:.60}.")
        input_ids = self.tokenizer(inputs, **(tokenizer_kwargs or {}))["input_ids"]
        mask_id = self.tokenizer.mask_token_id
        runs = _mask_runs(input_ids, mask_id)
        if not runs:
            raise PipelineException(
                "fill-mask", NPM_MODEL_TYPE, f"No mask_token ({self.tokenizer.mask_token}) found on the input: put "
                f"{self.tokenizer.mask_token} where the answer goes, e.g. 'Paris is the capital of "
                f"{self.tokenizer.mask_token}.'"
            )
        input_ids, runs = self._truncate(input_ids, runs)
        model_ids, queries = self._query_layout(input_ids, runs)
        model_inputs = {
            "input_ids": torch.tensor([model_ids]),
            "attention_mask": torch.ones(1, len(model_ids), dtype=torch.long),
        }
        return {"model_inputs": model_inputs, "queries": queries, "input_ids": input_ids, "runs": runs, "text": inputs}

    def _query_layout(self, input_ids: list[int], runs: list[tuple[int, int]]):
        """The ids the encoder sees and, per answer, the positions of its query vectors.

        Span mode: a single mask is duplicated into the (start, end) pair; two adjacent masks already are one.
        """
        mask_id = self.tokenizer.mask_token_id
        if self.model.config.mode == "single":
            return input_ids, [(i,) for start, length in runs for i in range(start, start + length)]
        too_long = [length for _, length in runs if length > 2]
        if too_long:
            raise ValueError(
                f"Span-mode NPM reads one masked span as one {self.tokenizer.mask_token} (or two adjacent ones: "
                f"start and end); got a run of {max(too_long)} adjacent masks. Use one mask per answer phrase."
            )
        model_ids, queries, cursor = [], [], 0
        for start, length in runs:
            model_ids.extend(input_ids[cursor:start])
            queries.append((len(model_ids), len(model_ids) + 1))
            model_ids.extend([mask_id, mask_id])
            cursor = start + length
        model_ids.extend(input_ids[cursor:])
        return model_ids, queries

    def _truncate(self, input_ids: list[int], runs: list[tuple[int, int]]):
        """Keep a window of the encoder's length around the masks (with a warning) when the input is too long."""
        extra = sum(1 for _, length in runs if length == 1) if self.model.config.mode == "span" else 0
        limit = _max_input_length(self.model.config, self.tokenizer) - extra
        if len(input_ids) <= limit:
            return input_ids, runs
        first, last = runs[0][0], runs[-1][0] + runs[-1][1]
        if last - first > limit:
            raise ValueError(
                f"The masks are {last - first} tokens apart, more than the encoder's limit of {limit}; split the "
                "input so that each piece has its masks within that distance."
            )
        lo = max(0, min(first - (limit - (last - first)) // 2, len(input_ids) - limit))
        logger.warning(
            f"Input of {len(input_ids)} tokens is longer than the encoder's limit ({limit}); keeping tokens "
            f"{lo}..{lo + limit} around the mask."
        )
        return input_ids[lo : lo + limit], [(start - lo, length) for start, length in runs]

    # ----------------------------------------------------------------------------------------------- forward
    def get_inference_context(self):
        """`torch.inference_mode` rather than the stock `torch.no_grad`: the encoder forward of a query skips autograd's
        version counters (~2 % of it on CPU); nothing here needs gradients, and `_forward` returns numpy arrays."""
        return torch.inference_mode

    def forward(self, model_inputs, **forward_params):
        """`Pipeline.forward` without its two recursive copies (to the device and back to the CPU) of the whole input
        and output, which visit every token id of their lists: `_forward` moves the encoder's tensors to the device
        itself and returns numpy arrays and plain values (~0.5 ms of a query on CPU)."""
        with self.device_placement(), self.get_inference_context()():
            return self._forward(model_inputs, **forward_params)

    def _forward(self, inputs):
        model_inputs = self._ensure_tensor_on_device(inputs["model_inputs"], self.device)  # also when called directly
        return self.read_hidden_states(inputs, self.model(**model_inputs).last_hidden_state[0])

    def read_hidden_states(self, inputs, hidden):
        """What `postprocess` needs from one input's last hidden states: its query vectors and its mean-pooled
        embedding over the real, unmasked tokens (the dense pre-filter's query). Batched callers use it too."""
        ids = inputs["model_inputs"]["input_ids"][0]
        hidden = hidden[: len(ids)].detach().float()
        query_vectors = [hidden[list(positions)].cpu().numpy() for positions in inputs["queries"]]
        content = ~torch.isin(ids, torch.tensor(self.tokenizer.all_special_ids, device=ids.device))
        pooled = hidden[content.to(hidden.device)].mean(dim=0) if content.any() else hidden.mean(dim=0)
        return {"query_vectors": query_vectors, "query_embedding": pooled.cpu().numpy(),
                "input_ids": inputs["input_ids"], "runs": inputs["runs"], "text": inputs["text"]}

    # ------------------------------------------------------------------------------------------- postprocess
    def postprocess(self, outputs, top_k=5, targets=None, decoding: NPMDecodingConfig | None = None):
        decoding = decoding or self.decoding
        predictor = self.predictor.using(decoding)
        single_mode = self.model.config.mode == "single"
        if targets is not None:
            targets = self._targets_in_index(targets)
        target_ids = self._single_target_ids(targets) if single_mode and targets is not None else None
        answer_slots = _answer_slots(outputs["runs"], single_mode)
        restricted = self.prefilters.candidates(decoding, outputs["text"], outputs["query_embedding"],
                                                self.tokenizer.mask_token)
        exclude = None
        if not single_mode and targets is None and decoding.exclude_query_phrases:
            exclude = predictor.query_phrase_hashes(outputs["input_ids"])
        results = []
        hits = outputs.get("hits") or [None] * len(answer_slots)  # searched in advance by a batched call
        for vectors, (start, length), found in zip(outputs["query_vectors"], answer_slots, hits):
            candidates = restricted or Candidates.whole_index(found)
            if single_mode:
                answers = predictor.predict_single(vectors[0], top_k, candidates, target_ids=target_ids)
            else:
                answers = predictor.predict_span(vectors[0], vectors[1], top_k, candidates, targets=targets,
                                                 exclude=exclude)
            for answer in answers:
                answer["sequence"] = self._fill(outputs["input_ids"], start, length, answer.pop("token_ids"),
                                                single=len(answer_slots) == 1)
            if len(answers) < top_k and targets is None and self.index.num_indexed:
                logger.info(f"top_k={top_k}, but only {len(answers)} answers could be formed from the candidates.")
            results.append([_ordered(answer) for answer in answers])
        return results[0] if len(results) == 1 else results

    def _targets_in_index(self, targets: list[str]) -> list[str]:
        """The targets that can be answers at all: a target with a token the index never holds (e.g. the unknown
        token of a word outside the vocabulary) is left out with a warning; none left is an error."""
        kept = []
        for target in targets:
            # as written at the start of a text or after a space (byte-level BPE spells the two differently)
            spellings = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in (target, " " + target)]
            ids = spellings[0]
            if any(self.index.holds_token_ids(spelling) for spelling in spellings):
                kept.append(target)
            else:
                logger.warning_once(f"The target {target!r} ({self.tokenizer.convert_ids_to_tokens(ids)}) does not "
                                    f"occur in the index at {self.index.path}: it cannot be an answer; ignoring it.")
        if not kept:
            raise ValueError(f"None of the targets {targets!r} occurs in the index, so none can be scored; pass "
                             "phrases of the reference corpus.")
        return kept

    def _fill(self, input_ids: list[int], start: int, length: int, answer_ids: list[int], single: bool) -> str:
        ids = input_ids[:start] + answer_ids + input_ids[start + length :]
        pad = self.tokenizer.pad_token_id  # once: a tokenizer property costs a vocabulary lookup per read
        ids = [i for i in ids if i != pad]
        return self.tokenizer.decode(ids, skip_special_tokens=single)

    def _single_target_ids(self, targets: list[str]) -> list[int]:
        ids = []
        for target in targets:
            pieces = self.tokenizer(target, add_special_tokens=False)["input_ids"]
            if not pieces:
                raise ValueError(f"The target {target!r} tokenizes to nothing; pass a word of the vocabulary.")
            if len(pieces) > 1:
                logger.warning(
                    f"NPM-single answers single tokens; the target {target!r} is several tokens, scoring its first "
                    f"({self.tokenizer.convert_ids_to_tokens(pieces[0])!r})."
                )
            if pieces[0] not in ids:
                ids.append(pieces[0])
        return ids

    def __call__(self, inputs, **kwargs):
        batch_size = kwargs.pop("batch_size", None)
        batch_size = (1 if self._batch_size is None else self._batch_size) if batch_size is None else batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if isinstance(inputs, list) and not inputs:
            return []  # no texts, no answer lists
        if isinstance(inputs, list) and batch_size > 1:  # our own batching: the stock collate cannot pad our inputs
            outputs = self._call_batched(inputs, batch_size, **kwargs)
        else:
            outputs = super().__call__(inputs, **kwargs)
        if isinstance(inputs, list) and len(inputs) == 1:
            return outputs[0]
        return outputs

    # ------------------------------------------------------------------------------------------------ batches
    def _call_batched(self, texts: list[str], batch_size: int, **kwargs) -> list:
        """Lists of texts with `batch_size` > 1: padded forward passes (`forward_batch`) and one search per batch
        (the per-text answers are those of one text at a time, up to float rounding)."""
        preprocess_params, _, postprocess_params = self._sanitize_parameters(**kwargs)
        preprocess_params = {**self._preprocess_params, **preprocess_params}  # constructor values, then this call's
        postprocess_params = {**self._postprocess_params, **postprocess_params}
        results = []
        for lo in range(0, len(texts), batch_size):
            outputs = self.forward_batch([self.preprocess(text, **preprocess_params)
                                          for text in texts[lo : lo + batch_size]])
            self.search_batch(outputs, postprocess_params.get("decoding"))
            results.extend(self.postprocess(output, **postprocess_params) for output in outputs)
        return results

    def forward_batch(self, prepared: list[dict]) -> list[dict]:
        """`_forward` for several preprocessed inputs in padded forward passes: one on an accelerator; on CPU, where
        padding costs as much compute as text, one per group of inputs of similar length."""
        ids = [item["model_inputs"]["input_ids"][0] for item in prepared]
        groups = [range(len(ids))] if self.device.type != "cpu" else _length_groups([len(row) for row in ids])
        outputs = [None] * len(prepared)
        for group in groups:
            input_ids = torch.full((len(group), max(len(ids[i]) for i in group)), self.tokenizer.pad_token_id or 0)
            attention = torch.zeros_like(input_ids)
            for row, i in enumerate(group):
                input_ids[row, : len(ids[i])], attention[row, : len(ids[i])] = ids[i], 1
            with self.device_placement(), torch.inference_mode():
                hidden = self.model(input_ids=input_ids.to(self.device),
                                    attention_mask=attention.to(self.device)).last_hidden_state
            for row, i in enumerate(group):
                outputs[i] = self.read_hidden_states(prepared[i], hidden[row])
        return outputs

    def search_batch(self, outputs: list[dict], decoding: NPMDecodingConfig | None = None) -> None:
        """Search every query vector of the batch in one call (`NPMIndexReader.search_many`); each output gets its
        slots' `hits`. `decoding`: the settings of the call (default: the pipeline's)."""
        decoding = decoding or self.decoding
        if decoding.prefilter != "none":
            return  # pre-filtered answers are scored over their own blocks, not searched
        vectors = [slot for output in outputs for slot in output["query_vectors"]]
        scores, rows = self.predictor.using(decoding).search(np.concatenate(vectors), batch=True)
        cursor = 0
        for output in outputs:
            output["hits"] = []
            for slot in output["query_vectors"]:
                output["hits"].append((scores[cursor : cursor + len(slot)], rows[cursor : cursor + len(slot)]))
                cursor += len(slot)


def _mask_runs(input_ids: list[int], mask_id: int) -> list[tuple[int, int]]:
    """(start, length) of every run of adjacent mask tokens."""
    runs = []
    for i, token in enumerate(input_ids):
        if token != mask_id:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _answer_slots(runs: list[tuple[int, int]], single_mode: bool) -> list[tuple[int, int]]:
    """Which input tokens each answer replaces: one mask in single mode, a whole run in span mode."""
    if single_mode:
        return [(i, 1) for start, length in runs for i in range(start, start + length)]
    return runs


def _length_groups(lengths: list[int], max_padding: float = 0.25) -> list[list[int]]:
    """Indices of `lengths` grouped by length (shortest first), each group padded to its longest with padding of at
    most `max_padding` of its tokens."""
    groups, tokens = [], 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= (1 + max_padding) * (tokens + lengths[i]):
            groups[-1].append(i)
            tokens += lengths[i]
        else:
            groups.append([i])
            tokens = lengths[i]
    return groups


def _max_input_length(config, tokenizer) -> int:
    limit = config.max_input_length
    if tokenizer.model_max_length and tokenizer.model_max_length < 1_000_000:
        limit = min(limit, tokenizer.model_max_length)
    return limit


def _ordered(answer: dict) -> dict:
    keys = ("score", "token", "token_str", "sequence", "phrase", "evidence")
    return {key: answer[key] for key in keys}
