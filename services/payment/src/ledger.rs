//! The ledger: each account is an event-sourced aggregate
//! ([`trellis_events::es`]). Its balance is never stored as a number to be
//! updated; it is the fold of the account's entries — opened, charged,
//! refunded — and every movement of money is one appended, immutable
//! event. A ledger is a log, so it shows event sourcing at its most natural:
//! the history an auditor asks for is the data itself, two charges of one
//! account racing each other are an optimistic-concurrency conflict (the
//! loser runs again against the new balance), and a snapshot every 100
//! entries keeps loading an old, busy account short.
//!
//! The rules are pure: [`Account::decide`] turns a command into entries or
//! refuses it; [`Account::evolve`] applies one entry.

use serde::{Deserialize, Serialize};
use trellis_events::es::Aggregate;

/// An account's state: the fold of its entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Whether it has been opened (by its first charge).
    pub opened: bool,
    /// What it holds, in cents; never below zero.
    pub balance_cents: i64,
}

/// What the payment service asks of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Take `amount_cents` for `order_id`, opening the account with
    /// `opening_balance_cents` if this is its first charge.
    Charge {
        /// The order paid for.
        order_id: String,
        /// How much, in cents (checked by `biz::amount`).
        amount_cents: i64,
        /// What an account opens with.
        opening_balance_cents: i64,
    },
    /// Give back `amount_cents` that `order_id` was charged.
    Refund {
        /// The order refunded.
        order_id: String,
        /// How much, in cents.
        amount_cents: i64,
    },
}

/// One entry of the ledger (stored as JSON, e.g.
/// `{"Charged":{"order_id":"o-1","amount_cents":900}}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// The account was opened holding `balance_cents` (for accounts carried
    /// over from before the ledger, what they held then).
    Opened {
        /// The opening balance.
        balance_cents: i64,
    },
    /// `amount_cents` was taken for `order_id`.
    Charged {
        /// The order.
        order_id: String,
        /// The amount.
        amount_cents: i64,
    },
    /// `amount_cents` was given back for `order_id`.
    Refunded {
        /// The order.
        order_id: String,
        /// The amount.
        amount_cents: i64,
    },
}

impl Entry {
    /// Its kind as the API shows it: `opened`, `charged`, `refunded`.
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::Opened { .. } => "opened",
            Entry::Charged { .. } => "charged",
            Entry::Refunded { .. } => "refunded",
        }
    }
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Command = Command;
    type Event = Entry;

    fn decide(&self, command: &Command) -> Result<Vec<Entry>, String> {
        match command {
            Command::Charge {
                order_id,
                amount_cents,
                opening_balance_cents,
            } => {
                let mut entries = Vec::with_capacity(2);
                let mut balance = self.balance_cents;
                if !self.opened {
                    entries.push(Entry::Opened {
                        balance_cents: *opening_balance_cents,
                    });
                    balance = *opening_balance_cents;
                }
                if balance < *amount_cents {
                    return Err(format!(
                        "insufficient funds: {amount_cents} cents wanted, {balance} available"
                    ));
                }
                entries.push(Entry::Charged {
                    order_id: order_id.clone(),
                    amount_cents: *amount_cents,
                });
                Ok(entries)
            }
            Command::Refund {
                order_id,
                amount_cents,
            } => Ok(vec![Entry::Refunded {
                order_id: order_id.clone(),
                amount_cents: *amount_cents,
            }]),
        }
    }

    fn evolve(mut self, entry: &Entry) -> Account {
        match entry {
            Entry::Opened { balance_cents } => {
                self.opened = true;
                self.balance_cents = *balance_cents;
            }
            Entry::Charged { amount_cents, .. } => {
                self.balance_cents = self.balance_cents.saturating_sub(*amount_cents)
            }
            Entry::Refunded { amount_cents, .. } => {
                self.balance_cents = self.balance_cents.saturating_add(*amount_cents)
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(order: &str, amount: i64) -> Command {
        Command::Charge {
            order_id: order.into(),
            amount_cents: amount,
            opening_balance_cents: 1000,
        }
    }

    fn run(account: Account, command: &Command) -> Result<Account, String> {
        let entries = account.decide(command)?;
        Ok(entries.iter().fold(account, |a, e| a.clone().evolve(e)))
    }

    #[test]
    fn the_first_charge_opens_the_account() {
        let account = Account::default();
        assert_eq!(
            account.decide(&charge("o-1", 300)),
            Ok(vec![
                Entry::Opened {
                    balance_cents: 1000
                },
                Entry::Charged {
                    order_id: "o-1".into(),
                    amount_cents: 300
                },
            ])
        );
        let account = run(account, &charge("o-1", 300)).unwrap();
        assert_eq!(account.balance_cents, 700);
        // Opened once: the next charge is one entry.
        assert_eq!(account.decide(&charge("o-2", 100)).unwrap().len(), 1);
    }

    #[test]
    fn a_charge_never_takes_the_balance_below_zero() {
        let account = run(Account::default(), &charge("o-1", 1000)).unwrap();
        assert_eq!(account.balance_cents, 0);
        let refused = account.decide(&charge("o-2", 1)).unwrap_err();
        assert_eq!(refused, "insufficient funds: 1 cents wanted, 0 available");
        // Nothing was decided for a refused first charge either.
        assert!(Account::default().decide(&charge("o-3", 1001)).is_err());
        let refunded = run(
            account,
            &Command::Refund {
                order_id: "o-1".into(),
                amount_cents: 1000,
            },
        )
        .unwrap();
        assert_eq!(refunded.balance_cents, 1000);
    }

    #[test]
    fn entries_are_stored_as_tagged_json() {
        // The payment store's migration writes this shape for carried-over
        // accounts: it must stay readable.
        let carried: Entry = serde_json::from_str(r#"{"Opened":{"balance_cents":9100}}"#).unwrap();
        assert_eq!(
            carried,
            Entry::Opened {
                balance_cents: 9100
            }
        );
    }
}
