"""
Conversations for data/prepare.py: chat records in the two common layouts, rendered with the tokenizer's own
chat template exactly as transformers' apply_chat_template(messages) renders it, and the character spans of
the assistant's tokens that become the loss mask.

Records (one JSON object per line):
  {"messages": [{"role": "system"|"user"|"assistant"|..., "content": str, ...}, ...]}
  {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}        (ShareGPT)
ShareGPT's "from" becomes "role" by SHAREGPT_ROLES; a "messages" record passes its messages to the template
as they are (keys whose value is null dropped, and a reasoning field given under each of its names, as
transformers does), so roles such as "tool" and fields such as "tool_calls" reach templates that read them.

Rendering (ChatTemplate.render) is transformers' (utils/chat_template_utils.py): a jinja2
ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks and the loopcontrols extension, the
raise_exception and strftime_now globals, its tojson filter (no HTML escaping, ensure_ascii=False), the
{% generation %} tag rendered as its body, and the variables messages, tools=None, documents=None,
add_generation_prompt=False plus the named special tokens of tokenizer_config.json (bos_token, eos_token,
unk_token, sep_token, pad_token, cls_token, mask_token).

The assistant's tokens (ChatTemplate.assistant_spans): for each message with role "assistant", every token that
overlaps the characters from the start of its content as rendered through the end of the first control token (an
added token of the tokenizer, such as <|im_end|> or <|eot_id|>) after the content: the answer and the end-of-turn
token that closes it; for an empty content, that end-of-turn token alone. Never the role header, the template's
own text (a default system prompt), the newline a template puts after the end-of-turn token, or another message;
a token holding both template text and the content's first characters (Mistral's " A" after "[/INST]") counts.
Found without {% generation %} markers, by the first of these that works:
  1. markers: each assistant content wrapped in two private-use characters and rendered once; when the markers,
     taken out, leave exactly the real rendering, their places are the contents' (2 renders per conversation).
  2. growing prefixes, for templates that change a content they render (Llama 3 trims it): render messages[:i]
     and messages[:i + 1]; when each is a prefix of the next and of the whole conversation, message i's rendering
     is the difference, and its content (as given, else stripped) is searched for there after the generation
     prompt (render(messages[:i], add_generation_prompt=True), when that is a prefix): where the model starts
     answering at inference. A content the template rewrote (not found) covers all it rendered after the
     generation prompt, through its last control token.
  3. neither (a template that both re-renders earlier turns and rewrites contents): ChatError, the conversation
     cannot be masked.
"""
import hashlib
import json
import os
import re
from datetime import datetime

from lrc import LRCError

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool"}
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the special tokens a template sees as variables
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
LAYOUTS = ("messages", "conversations")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
MIN_JINJA = (3, 1, 6)  # transformers' floor too: older jinja2 sandboxes have known escapes, and templates are code
# Marker characters for method 1, from Unicode's private-use area: never produced by a template itself
_OPEN, _CLOSE = "\ue000", "\ue001"


class ChatError(Exception):
    """A conversation the template rejects or that cannot be masked; prepare.py adds the file and line."""


def conversation_of(record):
    """The messages of one chat record, or raise ChatError naming what is wrong with it."""
    if not isinstance(record, dict) or not any(k in record for k in LAYOUTS):
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise ChatError(f"record has neither 'messages' nor 'conversations' (it has: {keys}): chat records are "
                        f"{{\"messages\": [{{\"role\", \"content\"}}, ...]}} or ShareGPT's {{\"conversations\": "
                        f"[{{\"from\", \"value\"}}, ...]}}; pass --format=text for plain text")
    layout = "messages" if "messages" in record else "conversations"
    turns = record[layout]
    if not isinstance(turns, list):
        raise ChatError(f"'{layout}' is a {type(turns).__name__}, not a list of messages: fix or drop that record")
    if not turns:
        raise ChatError(f"empty conversation ('{layout}' holds no message): drop that record")
    role_key, content_key = ("role", "content") if layout == "messages" else ("from", "value")
    messages = []
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str):
            raise ChatError(f"message {n} of '{layout}' has no '{role_key}' string: each message is "
                            f"{{\"{role_key}\": ..., \"{content_key}\": ...}}")
        if not isinstance(turn.get(content_key), str):
            raise ChatError(f"message {n} of '{layout}' ({turn[role_key]}) has no '{content_key}' string "
                            f"(only text content is supported): fix or drop that record")
        if layout == "messages":
            message = {k: v for k, v in turn.items() if v is not None}
            reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
            if reasoning is not None:  # transformers passes a message's reasoning under each of its names
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            messages.append(message)
        elif turn["from"] in SHAREGPT_ROLES:
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
        else:
            raise ChatError(f"message {n} is from {turn['from']!r}, not one of ShareGPT's "
                            f"{', '.join(SHAREGPT_ROLES)}: rename it, or use the 'messages' layout")
    return messages


def _config_token(value):
    if isinstance(value, dict):  # older files store {"content": "</s>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_chat_template(json_path, config_path):
    """(template source, {special token name: string}, where the template came from) of a tokenizer, as
    transformers finds them: chat_template.jinja beside tokenizer_config.json first, else its "chat_template"
    (a string, or a list of {"name", "template"} of which "default" is used). Raises LRCError without one."""
    directory = os.path.dirname(config_path or json_path)
    jinja_path = os.path.join(directory, "chat_template.jinja")
    config = {}
    if config_path is not None:
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise LRCError(f"{config_path} cannot be read as JSON ({e}): fix the tokenizer's files") from None
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template, source = f.read(), jinja_path
    else:
        template, source = config.get("chat_template"), config_path
        if isinstance(template, list):
            template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    if not isinstance(template, str) or not template.strip():
        raise LRCError(f"the tokenizer has no chat template (no chat_template.jinja, no \"chat_template\" in "
                       f"{config_path or os.path.join(directory, 'tokenizer_config.json')}): chat records need one; "
                       f"pass the tokenizer of a chat (Instruct) model")
    special = {}
    legacy = os.path.join(directory, "special_tokens_map.json")  # transformers reads it too, under the config
    if os.path.isfile(legacy):
        try:
            with open(legacy, encoding="utf-8") as f:
                special = {k: _config_token(v) for k, v in json.load(f).items() if k in SPECIAL_TOKEN_NAMES}
        except (OSError, ValueError):
            special = {}
    special.update({k: _config_token(config[k]) for k in SPECIAL_TOKEN_NAMES if k in config})
    return template, {k: v for k, v in special.items() if v is not None}, source


def template_sha256(template):
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


class ChatTemplate:
    """A compiled chat template and what its spans need: the control-token strings of the tokenizer.

    clock: the time strftime_now reports (an ISO string), fixed for a whole preparation so that a template that
    prints today's date (Llama 3.2) renders every conversation alike, also after a resume on another day."""

    def __init__(self, template, special_tokens, control_tokens, clock=None):
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        version = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
        if version < MIN_JINJA:
            raise LRCError(f"jinja2 {jinja2.__version__} is older than 3.1.6, whose sandbox chat templates need: "
                           f"pip install -U 'jinja2>=3.1.6'")

        class Generation(Extension):
            """{% generation %}...{% endgeneration %} (transformers' assistant-mask markers): just the body."""
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.Scope(body).set_lineno(lineno)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        now = datetime.fromisoformat(clock) if clock else datetime.now()
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: now.strftime(fmt)
        try:
            self.template = env.from_string(template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise LRCError(f"the chat template does not parse (line {e.lineno}: {e.message}): fix the tokenizer's "
                           f"chat template") from None
        self.variables = dict(special_tokens)
        # Whitespace added tokens (Gemma's "\n\n") are text inside a template, not ends of turns.
        controls = sorted((t for t in control_tokens if t and not t.isspace()), key=len, reverse=True)
        self.controls = re.compile("|".join(map(re.escape, controls))) if controls else None
        self.errors = (jinja2.exceptions.TemplateError, TypeError, ValueError, AttributeError, KeyError,
                       IndexError, ZeroDivisionError)

    def render(self, messages, add_generation_prompt=False):
        """The conversation as text; ChatError with the template's own message when it rejects it."""
        try:
            return self.template.render(**self.variables, messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt)
        except self.errors as e:
            raise ChatError(f"the chat template rejects this conversation ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]})") from None

    def _try_render(self, messages, add_generation_prompt=False):
        try:
            return self.render(messages, add_generation_prompt)
        except ChatError:
            return None

    def assistant_spans(self, messages):
        """(rendered text, [(start, end) character span of each assistant message's tokens]); see the module
        docstring for the rule and how it is found."""
        text = self.render(messages)
        assistants = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if not assistants:
            return text, []
        spans = self._spans_by_markers(messages, text, assistants)
        if spans is None:
            spans = self._spans_by_prefixes(messages, text, assistants)
        if spans is None:
            raise ChatError("cannot find the assistant's messages in the rendered conversation (the chat template "
                            "re-renders earlier turns and rewrites their content), so no loss mask can be made: "
                            "fix or drop that record, or use a template that renders each turn once")
        return text, spans

    def _end_of_turn(self, text, content_end, limit):
        """End of the first control token in text[content_end:limit], else content_end."""
        match = self.controls.search(text, content_end, limit) if self.controls else None
        return match.end() if match else content_end

    def _spans_by_prefixes(self, messages, text, assistants):
        rendered = {len(messages): text, 0: ""}  # no messages: nothing (rendering [] mostly fails, slowly)
        spans = []
        for i in assistants:
            for k in (i, i + 1):
                if k not in rendered:
                    rendered[k] = self._try_render(messages[:k])
            before, after = rendered[i], rendered[i + 1]
            if before is None or after is None or not after.startswith(before) or not text.startswith(after):
                return None
            prompt = self._try_render(messages[:i], add_generation_prompt=True)
            start = len(prompt) if prompt is not None and len(prompt) >= len(before) and after.startswith(prompt) \
                else len(before)
            content = messages[i]["content"]
            if not content.strip():  # nothing to find: the end-of-turn token alone
                match = self.controls.search(after, start) if self.controls else None
                if match:
                    spans.append(match.span())
                continue
            found = after.find(content, start)
            if found < 0:  # a template that trims the content (Llama 3's | trim)
                content = content.strip()
                found = after.find(content, start)
            if found >= 0:
                spans.append((found, self._end_of_turn(after, found + len(content), len(after))))
            else:  # the template rewrote the content: all it rendered after the prompt, to its last control token
                ends = [m.end() for m in self.controls.finditer(after, start)] if self.controls else []
                spans.append((start, ends[-1] if ends else len(after)))
        return spans

    def _spans_by_markers(self, messages, text, assistants):
        if any(_OPEN in m["content"] or _CLOSE in m["content"] for m in messages):
            return None
        marked = [dict(m, content=_OPEN + m["content"] + _CLOSE) if i in assistants else m
                  for i, m in enumerate(messages)]
        rendered = self._try_render(marked)
        if rendered is None or rendered.count(_OPEN) != len(assistants) or rendered.count(_CLOSE) != len(assistants):
            return None
        pieces, bounds, last = [], [], 0
        for n, match in enumerate(re.finditer(f"[{_OPEN}{_CLOSE}]", rendered)):
            if match.group() != (_OPEN, _CLOSE)[n % 2]:  # out of order: the template moved contents around
                return None
            pieces.append(rendered[last:match.start()])
            bounds.append(sum(map(len, pieces)))
            last = match.end()
        pieces.append(rendered[last:])
        if "".join(pieces) != text:  # the markers changed what the template rendered: no use
            return None
        spans = []
        for a, b, limit in zip(bounds[0::2], bounds[1::2], bounds[2::2] + [len(text)]):
            if a == b:  # an empty content: the end-of-turn token alone
                match = self.controls.search(text, b, limit) if self.controls else None
                spans += [match.span()] if match else []
            else:
                spans.append((a, self._end_of_turn(text, b, limit)))
        return spans


def mask_of(offsets, spans, n_tokens):
    """uint8 mask over tokens: 1 where a token's character range (start, end) overlaps one of the spans."""
    import numpy as np
    mask = np.zeros(n_tokens, dtype=np.uint8)
    if spans and n_tokens:
        bounds = np.asarray(offsets, dtype=np.int64).reshape(n_tokens, 2)
        for a, b in spans:
            mask[(bounds[:, 1] > a) & (bounds[:, 0] < b)] = 1
    return mask
