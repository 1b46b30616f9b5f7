"""Prompt templates and the Qwen-style chat template (one definition each).

`{content}` in a template is replaced by the row's problem text (stripped). The `<image>`
placeholder in the problem text marks where each image goes.
"""
from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"

# The PAPO reference code's format prompt (EasyR1 examples/format_prompt/math.jinja,
# `{{ content | trim }} ...`), used for ViRL39K training and evaluation.
PAPO_FORMAT_PROMPT = (
    "{content} You FIRST think about the reasoning process as an internal monologue and then "
    "provide the final answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE put in \\boxed{}."
)

# Short prompt for the synthetic shapes task (a tiny model must learn it in minutes).
SYNTHETIC_PROMPT = "{content} Answer in \\boxed{}."

# Named templates selectable from a config; "none" passes the problem text through.
PROMPT_TEMPLATES = {"papo": PAPO_FORMAT_PROMPT, "synthetic": SYNTHETIC_PROMPT, "none": "{content}"}

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL / Qwen2.5-VL chat layout: a default system turn, then
# <|im_start|>role\n...<|im_end|>\n per message; an image is <|vision_start|><|image_pad|><|vision_end|>.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def render_prompt(template: str, problem: str) -> str:
    """Fill a prompt template with the problem text (plain substitution: other braces stay as written)."""
    if "{content}" not in template:
        raise ValueError(f"prompt template must contain '{{content}}'; got {template!r}")
    return template.replace("{content}", problem.strip())


def user_message(prompt: str) -> list[dict]:
    """One user turn whose content interleaves text and images at each `<image>` placeholder."""
    content: list[dict] = []
    for i, text in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if i:
            content.append({"type": "image"})
        if text:
            content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]
