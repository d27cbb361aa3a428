"""One module per pipeline stage: a pure function from paths and spec to a typed result."""
