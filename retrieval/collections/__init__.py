"""Vector collections shared by every worker of a host, or of many hosts: the
store (:mod:`.store`), the database it keeps them in (:mod:`.database`, the
interface; :mod:`.sqlite_db` and :mod:`.postgres_db`, the two stores;
:mod:`.storage`, the SQLite files and the failures both report; :mod:`.factory`,
which store a location means), the documents and their checks
(:mod:`.documents`), and the shared index snapshots (:mod:`.snapshot`)."""
