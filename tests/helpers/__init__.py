"""Helpers shared by the tests, in one place: the tiny-model factory, hand-written losses and gradient
comparisons (the independent computations the tests check against), the HF examples and collator, and the
two-process launcher. No test module imports another."""
