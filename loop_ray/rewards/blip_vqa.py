"""BLIP-VQA attribute-binding reward of T2I-CompBench (Huang et al., 2023, "T2I-CompBench", section
4.1; used there for the colour, shape and texture categories).

    phrases(c) = the noun phrases of the prompt c            e.g. ["a green bench", "a red car"]
    s(x, q)    = P(yes | x, q) / (P(yes | x, q) + P(no | x, q))
    r(x, c)    = prod_{q in phrases(c)} s(x, q + "?")

P(yes) and P(no) are the probabilities of the answer tokens "yes" and "no" at the first answer
position of a BLIP VQA model (transformers' BlipForQuestionAnswering: the image is encoded by the
vision tower, the question by the image-grounded text encoder, and the answer decoder is run for one
step from its start token). T2I-CompBench asks the same questions (each noun chunk followed by
"?") and multiplies the answers' "yes" probabilities; here the yes/no ratio makes each factor a
proper two-way probability. r lies in [0, 1]. Questions are batched by token length, never padded
(transformers' BLIP text attention drops the padding mask in cross-attention, so padding would leak
into the answer); a batch of images therefore scores exactly as the images one by one.

Noun phrases come from `noun_phrases`, a small rule-based chunker instead of spaCy's (no model
download). It lower-cases and tokenises the prompt, then:
  * a determiner or number ("a", "an", "the", "two", "its", ...) starts a new phrase;
  * conjunctions, prepositions, pronouns, common verbs/auxiliaries and punctuation end a phrase
    ("and", "with", "on", "next", "is", "while", ",", ...);
  * "and" / "," between an attribute word (a colour, shape, size or material such as "black",
    "round", "wooden") and a following non-determiner word stay inside the phrase, so
    "a black and white dog" is one phrase;
  * "of" followed by a content word stays inside ("a triangular slice of cake"; spaCy would split);
  * after a noun-like word (not an attribute), a word ending in -ing/-ed or a word followed by a
    determiner is taken as a verb and ends the phrase ("a man standing" -> "a man", "the glass vase
    and metallic stand display the flowers" -> ..., "metallic stand", "the flowers"), except for a
    few nouns such as "ring" or "ceiling"; an -ly adverb outside a phrase and before a verb is dropped;
  * phrases with no content word, and T2I-CompBench's excluded phrases ("top", "the side",
    "the left", "the right"), are dropped. A prompt with no phrase is asked as a whole.
On T2I-CompBench's templated prompts ("a green bench and a red car", "rubber gloves and a metallic
spoon") this gives exactly the two object phrases; on free-form sentences it approximates spaCy's
noun chunks.

The model and processor load from a local folder (or a Hugging Face id in the local cache) holding
both, e.g. Salesforce/blip-vqa-base saved with save_pretrained.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from loop_ray.rewards import as_uint8_images, register

# ---------------------------------------------------------------------------------------------
# Rule-based noun-phrase chunker

def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


DETERMINERS = _words(
    "a an the one two three four five six seven eight nine ten some many several few its his her their "
    "my our your this these those another each every both"
)
_PREPOSITIONS = _words(
    "with without on in at by to into onto from for near next beside besides behind under underneath over "
    "above below between among against along across through around inside outside atop upon beneath "
    "toward towards front off out up down like than via during after before"
)
_CONJUNCTIONS_PRONOUNS = (
    "and or but nor while as then so because although though whereas which who whom whose that where when "
    "what how it they them he she him we us i you there here together also just very too not"
)
_VERBS = (
    "is are was were be been being am has have had do does did could would should might must "
    "sit sits sat stands stood lies lay hang hangs hung holds held rest rests looks perch perches "
    "feature features provide provides add adds complete completes glide glides slide slides stir stirs "
    "shine shines float floats clink clinks tighten tightens creak creaks shift shifts simmer simmers "
    "scribble scribbles click clicks accompany accompanies flash flashes make makes made contain contains "
    "falls fill fills cover covers stir grow grows keep keeps create creates give gives gets get "
    "go goes come comes run runs flow flows play plays"
)
_VERB_SET = _words(_VERBS)
BREAK_WORDS = _PREPOSITIONS | _words(_CONJUNCTIONS_PRONOUNS) | _VERB_SET
ATTRIBUTES = _words(
    # colours
    "red orange yellow green blue purple pink brown black white gray grey silver gold golden beige tan "
    "violet maroon navy teal turquoise cream ivory crimson bright dark light pale "
    # shapes and sizes
    "round circular square rectangular triangular oval oblong spherical cubic cylindrical conical "
    "pyramidal pentagonal hexagonal octagonal diamond teardrop crescent big small large tiny tall short "
    "long wide narrow thin thick huge little "
    # materials and textures
    "wooden wood metallic metal plastic glass fabric leather rubber fluffy furry soft hard smooth rough "
    "shiny striped spotted"
)
NOUNS_ENDING_ING_ED = _words(
    "ring earring string thing king wing spring swing ceiling building painting wedding lighting flooring "
    "seating clothing icing frosting pudding railing awning evening morning bedding stuffing dressing "
    "red bed shed sled seed weed seaweed reed speed tweed steed"
)
EXCLUDED_PHRASES = frozenset({"top", "the side", "the left", "the right"})
_TOKEN = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*|[,;:.!?()\"]")


def _is_verb_form(word: str) -> bool:
    return word.endswith(("ing", "ed")) and len(word) > 4 and word not in NOUNS_ENDING_ING_ED


def noun_phrases(prompt: str) -> list[str]:
    """Noun phrases of a CompBench-style prompt (rules in the module docstring), lower-cased."""
    tokens = _TOKEN.findall(prompt.lower())
    phrases: list[str] = []
    cur: list[str] = []

    def content(words: list[str]) -> list[str]:
        return [w for w in words if w not in DETERMINERS and w not in ("and", "of")]

    def flush() -> None:
        while cur and cur[-1] in ("and", "of"):
            cur.pop()
        if content(cur):
            phrase = " ".join(cur)
            if phrase not in EXCLUDED_PHRASES:
                phrases.append(phrase)
        cur.clear()

    prev_token = None
    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        nxt_is_word = nxt is not None and nxt[0].isalnum() and nxt not in DETERMINERS and nxt not in BREAK_WORDS
        if tok in ("and", ",") and cur and cur[-1] in ATTRIBUTES and nxt_is_word:
            if tok == "and":
                cur.append(tok)  # "black and white": one phrase
        elif tok == "of":
            if content(cur) and nxt_is_word:
                cur.append(tok)  # "a slice of cake": one phrase
            else:
                flush()  # "in front of", "a slice of the cake"
        elif tok in DETERMINERS:
            flush()
            cur.append(tok)
        elif tok in BREAK_WORDS or not tok[0].isalnum():
            flush()
        elif (_is_verb_form(tok) or nxt in DETERMINERS) and content(cur) and cur[-1] not in ATTRIBUTES:
            flush()  # "a man standing", "the wooden spatula cooks the pancakes": a verb after a noun
        elif _is_verb_form(tok) and not cur and prev_token is not None and prev_token not in _PREPOSITIONS:
            flush()  # "is sitting", ", revealing"
        elif not cur and tok.endswith("ly") and nxt is not None and (nxt in _VERB_SET or _is_verb_form(nxt)):
            pass  # an adverb outside a phrase, before a verb: "are neatly arranged"
        else:
            cur.append(tok)
        prev_token = tok
    flush()
    return phrases


def vqa_questions(prompt: str) -> list[str]:
    """T2I-CompBench's questions for a prompt: each noun phrase followed by "?" (the whole prompt if none)."""
    phrases = noun_phrases(prompt)
    if not phrases:
        phrases = [prompt.strip().rstrip(".!?").strip().lower() or prompt]
    return [p + "?" for p in phrases]


# ---------------------------------------------------------------------------------------------
# The reward


def _resolve_local(path_or_id: str) -> str:
    """A local folder, or a Hugging Face id resolved from the local cache only."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return str(path)
    hint = (
        f"BLIP VQA weights not found at {path_or_id!r}: put a folder with the model and its processor there "
        "(on a machine with network access: BlipForQuestionAnswering.from_pretrained('Salesforce/blip-vqa-base')"
        ".save_pretrained(DIR) and BlipProcessor.from_pretrained(...).save_pretrained(DIR), then copy DIR), or "
        "give a Hugging Face id already in the local cache"
    )
    if path_or_id.startswith(("/", ".", "~")) or path_or_id.count("/") != 1:
        raise FileNotFoundError(hint)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path_or_id, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any cache miss is reported the same way
        raise FileNotFoundError(f"{hint} ({type(err).__name__}: {err})") from None


class BlipVqaScore:
    """r(x, c) = prod over noun phrases q of c of P(yes)/(P(yes)+P(no)) for the question "q?"."""

    def __init__(self, model, processor, device: torch.device, batch_size: int = 32):
        self.model = model.eval().requires_grad_(False).to(device)
        self.processor = processor
        self.device = device
        self.batch_size = int(batch_size)
        tokenizer = processor.tokenizer
        ids = tokenizer.convert_tokens_to_ids(["yes", "no"])
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError("blip_vqa: the tokenizer has no single token for 'yes' or 'no'")
        self.yes_id, self.no_id = ids
        self.start_id = model.config.text_config.bos_token_id

    @torch.inference_mode()
    def image_embeds(self, images: np.ndarray) -> torch.Tensor:
        """[B, N, D] vision-tower states of uint8 images, preprocessed by the model's own processor."""
        dtype = next(self.model.vision_model.parameters()).dtype
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start:start + self.batch_size])
            pixels = self.processor.image_processor(images=chunk, return_tensors="pt")["pixel_values"]
            out.append(self.model.vision_model(pixel_values=pixels.to(self.device, dtype)).last_hidden_state)
        return torch.cat(out)

    @torch.inference_mode()
    def yes_probability(self, image_embeds: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """[N] P(yes)/(P(yes)+P(no)) of the first answer token for N (image states, question ids) pairs.

        The N questions must have the same token length (no padding): transformers' BLIP text attention
        does not apply the padding mask in its cross-attention, so padded questions would change the answer.
        """
        input_ids = input_ids.to(self.device)
        ones = torch.ones(input_ids.shape, dtype=torch.long, device=self.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        question = self.model.text_encoder(
            input_ids=input_ids, attention_mask=ones,
            encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
        ).last_hidden_state
        start = torch.full((len(input_ids), 1), self.start_id, dtype=torch.long, device=self.device)
        logits = self.model.text_decoder(
            input_ids=start, encoder_hidden_states=question, encoder_attention_mask=ones,
        ).logits[:, 0, :].float()
        yes_no = torch.stack([logits[:, self.yes_id], logits[:, self.no_id]], dim=-1)
        return torch.softmax(yes_no, dim=-1)[:, 0]  # softmax over {yes, no} = P(yes) / (P(yes) + P(no))

    def __call__(self, images, prompts: Sequence[str]) -> np.ndarray:
        images = as_uint8_images(images)
        if len(prompts) != len(images):
            raise ValueError(f"blip_vqa: {len(images)} images but {len(prompts)} prompts")
        if len(images) == 0:
            return np.zeros(0, dtype=np.float32)
        embeds = self.image_embeds(images)
        # (image index, question token ids), grouped by token length so that no batch is padded
        by_length: dict[int, list[tuple[int, list[int]]]] = {}
        for i, prompt in enumerate(prompts):
            for ids in self.processor.tokenizer(vqa_questions(prompt))["input_ids"]:
                by_length.setdefault(len(ids), []).append((i, ids))
        log_r = np.zeros(len(images), dtype=np.float64)
        for pairs in by_length.values():
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start:start + self.batch_size]
                index = torch.tensor([i for i, _ in chunk], device=embeds.device)
                ids = torch.tensor([q for _, q in chunk], dtype=torch.long)
                probs = self.yes_probability(embeds[index], ids).double().cpu().numpy()
                for (i, _), p in zip(chunk, probs):
                    log_r[i] += np.log(max(p, 1e-300))
        return np.exp(log_r).astype(np.float32)


@register("blip_vqa")
def build_blip_vqa(
    path: str = "Salesforce/blip-vqa-base",
    device: str | None = None,
    dtype: str = "fp32",
    batch_size: int = 32,
) -> BlipVqaScore:
    """BLIP-VQA score; `path` is a local folder with the model and processor, or a cached Hub id."""
    from transformers import BlipForQuestionAnswering, BlipProcessor

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"blip_vqa: dtype={dtype!r} must be one of {sorted(dtypes)}")
    folder = _resolve_local(path)
    try:
        processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
        model = BlipForQuestionAnswering.from_pretrained(folder, local_files_only=True, dtype=dtypes[dtype])
    except OSError as err:
        raise FileNotFoundError(f"BLIP VQA folder {folder} is incomplete (model and processor files expected): "
                                f"{err}") from None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return BlipVqaScore(model, processor, dev, batch_size)
