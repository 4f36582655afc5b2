"""Base class for every typed config section: strict keys, field docstrings as descriptions."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown keys are errors, and each field's docstring documents it."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=False)
