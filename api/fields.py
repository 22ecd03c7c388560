"""Field types shared by the request models.

Money and tokens enter only as JSON integers. pydantic's lax `int` would take `true`, `"1"`,
`" 5 "`, `1.0` and `1e3` and charge them; `StrictInt` answers 422 naming the field instead (the
README's promise). Bounds stay on each field: `tokens: StrictInt = Field(gt=0)`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Strict

__all__ = ["StrictInt"]

StrictInt = Annotated[int, Strict()]
