"""The learning-loop simulator: does the weekly loop learn, and how fast per reviewed prompt?

One *run* is one review strategy with one seed, in its own home and database
(:mod:`tasks.simulate.space`):

1. a first model is trained on ``initial_per_intent`` examples per intent of the train split (the
   *seed set*, also the base training set of every retrain), exported to ONNX and deployed;
2. every simulated week (:mod:`tasks.simulate.week`), ``traffic_per_week`` prompts of the train
   split not used before flow through the real NLU service (capture logger, serving ONNX
   classifier) into the database, each with a simulated workflow outcome; the real review
   export picks ``review_budget`` of them with the run's strategy; a stand-in reviewer fills
   ``corrected_intent`` from the true label; the real corrections import and the real weekly
   cycle (training data export, retrain, gate, ONNX export, deploy) run;
3. after each week the serving model is scored on the test split, which never enters training.

The data and the traffic plan: :mod:`tasks.simulate.data`; the outputs (``simulation.csv``,
``simulation.png``, the table): :mod:`tasks.simulate.results`; the all-labels ceiling:
:mod:`tasks.simulate.reference`. ``flows.simulate`` sequences them.
"""
