"""The machinery every other folder stands on: the settings tree (:mod:`.settings`), the run
directory's files, manifest and lock (:mod:`.io`), and the one stage protocol (:mod:`.protocol`).
Imports nothing of ``analyses`` outside this folder."""
