"""Speculative decoding: a drafter proposes tokens, the target verifies them all in one pass, exactly.
plan: options, pairing, the plan; policy: when and how long to draft; stepper: one round; costs; drafters."""

from edgeinfer.speculative.costs import CostBook, CostModel, pair_key
from edgeinfer.speculative.drafters import Draft, Drafter, ModelDrafter, NgramDrafter
from edgeinfer.speculative.plan import (AUTO, LONG_CONTEXT, NGRAM, NOT_EXACT, DraftOptions, SkippedStepper,
                                        SpeculationPlan, check_pair, cost_model, exact_batch, modelless_factory,
                                        plan_speculation, resolve_draft, speculation, stepper_factory)
from edgeinfer.speculative.policy import Choice, DraftPolicy
from edgeinfer.speculative.stepper import SpeculativeStepper

__all__ = ["AUTO", "LONG_CONTEXT", "NGRAM", "NOT_EXACT", "Choice", "CostBook", "CostModel", "Draft", "DraftOptions",
           "DraftPolicy", "Drafter", "ModelDrafter", "NgramDrafter", "SkippedStepper", "SpeculationPlan",
           "SpeculativeStepper", "check_pair", "cost_model", "exact_batch", "modelless_factory", "pair_key",
           "plan_speculation", "resolve_draft", "speculation", "stepper_factory"]
