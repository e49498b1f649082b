//! The user service as auth calls it: a registered account is a user there
//! (its id is the tokens' `sub`).

use shop_user::api::v1::{
    CreateUserRequest, DeleteUserRequest, User, user_service_client::UserServiceClient,
};
use trellis::Error;

/// A client of the user service: discovered through the registry
/// (balanced, with the default client stack), or at a fixed address.
#[derive(Clone)]
pub enum UserDirectory {
    /// Through the registry.
    Discovered(UserServiceClient<trellis::ResilientChannel>),
    /// At `users.endpoint`.
    Direct(UserServiceClient<tonic::transport::Channel>),
}

impl UserDirectory {
    /// Creates a user; its id.
    pub async fn create(&self, email: &str, display_name: &str) -> Result<String, Error> {
        let request = CreateUserRequest {
            user: Some(User {
                email: email.to_owned(),
                display_name: display_name.to_owned(),
                ..User::default()
            }),
        };
        let created = match self.clone() {
            UserDirectory::Discovered(mut c) => c.create_user(request).await,
            UserDirectory::Direct(mut c) => c.create_user(request).await,
        }
        .map_err(Error::from)?;
        Ok(created.into_inner().id)
    }

    /// Deletes a user (undoing a registration that failed half way).
    pub async fn delete(&self, id: &str) -> Result<(), Error> {
        let request = DeleteUserRequest { id: id.to_owned() };
        match self.clone() {
            UserDirectory::Discovered(mut c) => c.delete_user(request).await,
            UserDirectory::Direct(mut c) => c.delete_user(request).await,
        }
        .map(drop)
        .map_err(Error::from)
    }
}
