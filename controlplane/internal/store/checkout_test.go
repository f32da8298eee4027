package store

import "testing"

func TestCheckoutStatusNext(t *testing.T) {
	const (
		pending = CheckoutPending
		paid    = CheckoutPaid
		failed  = CheckoutFailed
	)
	for _, c := range []struct{ from, to, want CheckoutStatus }{
		{pending, pending, pending},
		{pending, paid, paid},
		{pending, failed, failed},
		{paid, pending, paid},
		{paid, failed, paid},
		{paid, paid, paid},
		{failed, pending, failed},
		{failed, paid, paid},
		{failed, failed, failed},
		{pending, "refunded", pending},
	} {
		if got := c.from.Next(c.to); got != c.want {
			t.Errorf("%s.Next(%s) = %s, want %s", c.from, c.to, got, c.want)
		}
	}
	// Any order of the same reports ends in the same status.
	orders := [][]CheckoutStatus{{pending, paid, failed}, {paid, failed, pending}, {failed, pending, paid}, {failed, paid, pending}}
	for _, o := range orders {
		s := o[0]
		for _, to := range o[1:] {
			s = s.Next(to)
		}
		if s != paid {
			t.Errorf("order %v ends %s, want paid", o, s)
		}
	}
}
