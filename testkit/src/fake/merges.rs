//! Keap's merge of two contacts, and a listing that misses a contact, as tests play them.
//!
//! A merge in Keap's web app keeps one contact, moves the other's addresses into the kept
//! one's free email slots and its tags onto it, and deletes the other: Keap then fires
//! `contact.delete` for the merged-away contact and `contact.edit` for the kept one.

use super::{rfc3339_ms, unix_ms, EmailAddress, EmailField, FakeKeap};

impl FakeKeap {
    /// Merges contact `gone` into `keep` as a person would in Keap's web app: `gone`'s
    /// addresses not already on `keep` fill `keep`'s free slots (EMAIL2, then EMAIL3; one that
    /// finds no free slot is lost, as in Keap), its tags are applied to `keep`, and `gone` is
    /// deleted. Fires `contact.delete` for `gone` and `contact.edit` for `keep`. Returns false
    /// (and changes nothing) unless both exist and differ.
    pub fn merge_contacts(&self, keep: i64, gone: i64) -> bool {
        let mut st = self.state();
        if keep == gone || !st.contacts.contains_key(&keep) {
            return false;
        }
        let Some(merged) = st.contacts.remove(&gone) else { return false };
        let moved: Vec<String> = merged.email_addresses.iter().filter_map(|e| e.email.clone()).collect();
        st.contacts.edit(keep, |c| {
            for email in moved {
                let held = c.email_addresses.iter().filter_map(|e| e.email.as_deref());
                if held.map(str::to_ascii_lowercase).any(|h| h == email.to_ascii_lowercase()) {
                    continue;
                }
                let used: Vec<EmailField> = c.email_addresses.iter().map(|e| e.field).collect();
                let free = [EmailField::Email1, EmailField::Email2, EmailField::Email3]
                    .into_iter()
                    .find(|f| !used.contains(f));
                if let Some(field) = free {
                    c.email_addresses.push(EmailAddress { email: Some(email), field });
                }
            }
            c.email_addresses.sort_by_key(|e| super::contacts::slot(e.field));
            c.last_updated = Some(rfc3339_ms(unix_ms()));
        });
        let tags = st.applied.remove(&gone).unwrap_or_default();
        st.applied.entry(keep).or_default().extend(tags);
        st.fire("contact.delete", gone);
        st.fire("contact.edit", keep);
        drop(st);
        self.kick_hooks();
        true
    }

    /// Makes the v2 listing leave contact `id` out (`true`) or list it again (`false`), as a
    /// listing served from a lagging replica might: reads by id (`GET /v1/contacts/{id}`) still
    /// answer it.
    pub fn hide_from_listings(&self, id: i64, hidden: bool) {
        let mut st = self.state();
        if hidden {
            st.unlisted.insert(id);
        } else {
            st.unlisted.remove(&id);
        }
    }
}
