-- Each order is updated once or twice after its insert (refund flag, final
-- status), and none of those columns is indexed: with room left on its page
-- the new row version stays there (a HOT update) and none of the table's
-- three indexes needs a new entry. Applies to pages written from now on.
ALTER TABLE orders SET (fillfactor = 70);
