"""The one exception family of edgeinfer."""

# Library code raises these with messages written for people; only the CLI turns
# them into a line on stderr and an exit code. The exit codes are part of the
# public interface (documented in the README), so scripts can tell failures apart.

from __future__ import annotations


class EdgeinferError(Exception):
    """Base of every error edgeinfer reports to a user."""

    exit_code = 1


class UsageError(EdgeinferError):
    """An option or argument the user gave cannot be used as given."""

    exit_code = 2


class ModelNotFoundError(EdgeinferError):
    """A model reference names nothing in the catalog, the store, the hub or the disk."""

    exit_code = 3


class SourceError(EdgeinferError):
    """No source could deliver the file (hub unreachable, 404, offline, mirror failed)."""

    exit_code = 4


class ChecksumError(EdgeinferError):
    """A downloaded file's sha256 differs from the one its source promised."""

    exit_code = 5


class InvalidModelError(EdgeinferError):
    """A file is not a GGUF llama.cpp could load safely (bad magic, truncated, absurd counts)."""

    exit_code = 6


class ResourceError(EdgeinferError):
    """Not enough disk space or memory for what was asked."""

    exit_code = 7


class IncompatibleModelsError(EdgeinferError):
    """A draft model cannot pair with a target (different tokenizers)."""

    exit_code = 8


class ConversionError(EdgeinferError):
    """A Hugging Face model cannot be converted (missing files, unsupported architecture)."""

    exit_code = 9


class GenerationError(EdgeinferError):
    """llama.cpp refused to evaluate a batch, or the prompt does not fit the context."""

    exit_code = 10


class ChatTemplateError(EdgeinferError):
    """The model's chat template fails (a division by zero, bad syntax) or goes past the bounds on its
    output, time or nesting; `--raw` still works, since it needs no template."""

    exit_code = 11


class RequestsFailed(EdgeinferError):
    """A batch ran, but some of its requests could not be answered (each has an error line in the output)."""

    exit_code = 12


class SchemaMismatchError(EdgeinferError):
    """An answer under --format json or --json-schema ended without matching it (cut short by --max-tokens, or
    breaking a rule the grammar could not enforce, such as a pattern or a minimum); the answer was still given.
    (Not 11, as issue 23 proposed: 11 is ChatTemplateError's, and scripts must tell the two apart.)"""

    exit_code = 13


class Interrupted(EdgeinferError):
    """The user pressed Ctrl-C; whatever was in progress was cleaned up."""

    exit_code = 130
