"""Stream processors (faust-streaming): recorded turns → transitions → judgements + hints → samples.

One module per stage, each a pure step plus its topic wiring; the topology is declared in
``processors.app``; ``nextstate process <stage>|all`` runs them, ``nextstate replay`` re-runs one
over history into another namespace, ``nextstate bench pipeline`` measures them.
"""
