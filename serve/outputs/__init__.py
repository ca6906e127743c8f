"""Model output parsing: generated text -> (reasoning, content, tool calls), streaming.

Wire-format agnostic: adapters in serve/protocols turn the events into Ollama, OpenAI or Web UI
shapes. Start with `select_parsers(architecture, template_source, prompt_text=...)`, feed each
`TokenEvent.text` to `push`, then call `finish` once.
"""

from serve.outputs.reasoning import Channel, Delta, HarmonySplitter, TagSplitter
from serve.outputs.registry import (
    OutputEvent,
    OutputFormat,
    OutputParser,
    ParsedOutput,
    ReasoningDelta,
    collect_output,
    select_format,
    select_parsers,
)
from serve.outputs.toolcalls import (
    ContentDelta,
    MalformedCall,
    ToolCall,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
    new_call_id,
)

__all__ = [
    "Channel",
    "ContentDelta",
    "Delta",
    "HarmonySplitter",
    "MalformedCall",
    "OutputEvent",
    "OutputFormat",
    "OutputParser",
    "ParsedOutput",
    "ReasoningDelta",
    "TagSplitter",
    "ToolCall",
    "ToolCallArgs",
    "ToolCallEnd",
    "ToolCallStart",
    "collect_output",
    "new_call_id",
    "select_format",
    "select_parsers",
]
