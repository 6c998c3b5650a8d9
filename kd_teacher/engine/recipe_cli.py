"""`kd-teacher recipe CONFIG [key=value ...] [--against FINGERPRINT]`: a teacher config's precision recipe in
words, its fingerprint and the serving policy the engine would apply (`kd_teacher.precision`)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("recipe", help="the teacher's precision recipe in words, its fingerprint and serving policy")
    p.add_argument("config", help="teacher config YAML (model:, engine:, checkpoint:)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--against", metavar="FINGERPRINT",
                   help="compare with another run's recipe fingerprint (a payload header's, a dump manifest's)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    # Imported here: building the parser of every subcommand must not import Megatron-Core.
    from kd_teacher.engine.loading import load_teacher_config
    from kd_teacher.engine.model import transformer_config
    from kd_teacher.precision import PrecisionRecipe, check_recipe, serving_policy

    cfg = load_teacher_config(args.config, args.overrides)
    recipe = PrecisionRecipe.from_transformer_config(transformer_config(cfg.model))
    policy = serving_policy(recipe, cfg.engine.repacking, invariance_table=cfg.engine.invariance_table)
    print(f"recipe:      {recipe.describe()}")
    print(f"fingerprint: {recipe.fingerprint()}")
    print(f"policy:      engine.repacking={policy.repacking}: {policy.describe()}")
    if args.against:
        check_recipe(args.against, recipe)  # raises RecipeMismatchError (a ValueError: exit code 2) in words
        print("same recipe as --against")
    return 0
