"""The ``ctd`` command line (:mod:`.cli`) and what ``ctd data show`` prints (:mod:`.summary`): the
top of the tree, above the stages it runs. Notebooks use the package's own face instead
(``from analyses import open_run``)."""
