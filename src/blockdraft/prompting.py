"""Turning user text into model input ids: chat template for chat models, raw text otherwise."""
from __future__ import annotations

from .errors import BlockdraftError


def encode_chat(tokenizer, turns: list[str], answers: list[str] | None = None, raw: bool = False) -> list[int]:
    """Ids for a conversation whose last user turn awaits an answer.

    turns[i] are user messages and answers[i] the assistant's replies to the earlier turns
    (len(answers) == len(turns) - 1). With raw=True or no chat template, the text is sent as is.
    """
    answers = answers or []
    if not turns or any(not t.strip() for t in turns):
        raise BlockdraftError("empty prompt: give some text to continue")
    if raw or not getattr(tokenizer, "chat_template", None):
        text = "\n".join(sum(([t, a] for t, a in zip(turns, answers)), []) + [turns[-1]])
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    messages = []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)
