"""Studies: the papers' analyses as reports (Markdown + JSON + PNG), built on the layers below.

* :mod:`.demo` -- paper 1 end to end on the embedded default (Table 1, monolingual regions);
* :mod:`.dims_report` -- dimensional dependence (paper 1 §3.3, Appendices C-E);
* :mod:`.neuron_report` -- paper 2's neuron analysis and sweeps;
* :mod:`.further_pretrain` -- further pre-training with the core region free, frozen or soft;
* :mod:`.region_plots`, :mod:`.plotting` -- figures, drawn without pyplot's global state.

Nothing is imported here, so importing one study does not import the others' dependencies.
"""
