"""The mechanism, method-agnostic: the session (install / track / restore), the denoiser hook,
`attend()` and the attention-edit protocol, layer selection, tokens and the `Control` base.

Nothing is imported here, so that the leaf modules (`controls`, `tokens`) can be used from below
(families, kernels) without pulling in the session.
"""
